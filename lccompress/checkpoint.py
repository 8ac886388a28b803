"""Reading reference checkpoints safely, and loading user code named on the command line.

Kinds: a state_dict saved with torch.save (read with weights_only=True), a .safetensors file, a
TorchScript archive, a torch.export .pt2 program, and a whole pickled nn.Module. Unpickling
a module runs code from the file, so it happens only with `trust=True`; a .pt2 program can
carry pickled objects too, so without trust only its weights are read (safely).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pickle
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .errors import LCError


class CheckpointError(LCError, ValueError):
    """A checkpoint cannot be read, or reading it would need the user's consent."""


@dataclass
class Checkpoint:
    """What a checkpoint file gave: its kind, its floating-point tensors, and a module if it holds one."""

    path: Path
    kind: str  # "state_dict" | "safetensors" | "torchscript" | "exported" | "module"
    state_dict: dict[str, Tensor]
    module: nn.Module | None = None
    notes: list[str] = field(default_factory=list)  # what reading it took (a prefix stripped, a nested dict chosen)


def _tensors(obj: Any) -> dict[str, Tensor]:
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)} if isinstance(obj, dict) else {}


def _flatten(obj: Any, path: Path, notes: list[str]) -> dict[str, Tensor]:
    """A state_dict from what torch.load gave: a tensor dict, one under a usual key ("state_dict",
    "model_state_dict", "model"), or the only nested dict of tensors; else an error naming those found."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and _tensors(obj[key]):
                obj = obj[key]
                break
        tensors = _tensors(obj)
        if tensors:
            return tensors
        nested = _nested(obj)
        if len(nested) == 1:
            (where, t), = nested
            notes.append(f"{path}: the weights are the nested dict {_where(where)} ({len(t)} tensors)")
            return t
        if nested:
            found = ", ".join(f"{_where(k)} ({len(t)} tensors)" for k, t in nested)
            raise CheckpointError(f"{path}: holds no tensors at its top level; nested dicts of tensors: {found}. "
                                  "Save the one you mean: torch.save(ckpt[KEY], 'weights.pt')")
    raise CheckpointError(f"{path}: holds no tensors by name (expected a state_dict)")


def _where(keys: tuple[str, ...]) -> str:
    return "".join(f"[{k!r}]" for k in keys)


def _nested(obj: dict) -> list[tuple[tuple[str, ...], dict[str, Tensor]]]:
    """(keys, tensors) of the dicts of tensors one or two levels down."""
    out = []
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, dict):
            continue
        if _tensors(v):
            out.append(((k,), _tensors(v)))
        else:
            out += [((k, k2), _tensors(v2)) for k2, v2 in v.items() if isinstance(k2, str) and _tensors(v2)]
    return out


def read_checkpoint(path: str | Path, *, trust: bool = False) -> Checkpoint:
    """Read a reference checkpoint; never unpickles code unless `trust`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise CheckpointError(f"{path}: the file is empty")
    if head[:4] == b"PK\x03\x04":
        return _read_zip(path, trust)
    if path.suffix == ".safetensors" or (len(head) == 8 and _looks_like_safetensors(path, head)):
        return _read_safetensors(path)
    if head[:1] == b"\x80":  # a legacy (non-zip) torch.save pickle
        return _read_pickle(path, trust)
    raise CheckpointError(f"{path}: not a checkpoint (not a torch.save file, safetensors, TorchScript or .pt2)")


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    n = int.from_bytes(head, "little")
    if not 2 <= n < 100_000_000:
        return False
    with open(path, "rb") as f:
        f.seek(8)
        return f.read(1) == b"{"


def _read_safetensors(path: Path) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return Checkpoint(path, "safetensors", load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _read_zip(path: Path, trust: bool) -> Checkpoint:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            bad = z.testzip()
    except Exception as e:  # noqa: BLE001 - BadZipFile, zlib.error, NotImplementedError, UnicodeDecodeError, ...
        raise CheckpointError(f"{path}: truncated or corrupt archive ({type(e).__name__}: {_first_line(e)})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt archive (member {bad} fails its checksum)")
    if any(n.endswith("/archive_format") for n in names):
        return _read_exported(path, names, trust)
    if any("/code/" in n for n in names) or any(n.endswith("/constants.pkl") for n in names):
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # noqa: BLE001 - TorchScript raises many kinds
            raise CheckpointError(f"{path}: unreadable TorchScript archive ({str(e).splitlines()[0]})") from None
        return Checkpoint(path, "torchscript", {k: v for k, v in module.state_dict().items()}, module)
    return _read_pickle(path, trust)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _read_pickle(path: Path, trust: bool) -> Checkpoint:
    needs_trust = False
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({_first_line(e)})") from None
        needs_trust = True
    except Exception as e:  # noqa: BLE001 - a damaged pickle can raise almost anything
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({_first_line(e)})") from None
    if needs_trust:
        if not trust:
            raise CheckpointError(
                f"{path}: a pickled Python object (such as a whole nn.Module); loading it runs code from "
                "the file. Pass --trust-checkpoint if you trust its source, or save model.state_dict() "
                "and give the model with --model")
        cwd = os.getcwd()
        sys.path.insert(0, cwd)  # a pickled module's class may live in a file of the working directory
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - the file's own code, or a damaged pickle
            raise CheckpointError(f"{path}: cannot unpickle it ({type(e).__name__}: {_first_line(e)}); a whole "
                                  "module needs its class importable (or save its state_dict)") from None
        finally:
            if cwd in sys.path:
                sys.path.remove(cwd)
    if isinstance(obj, nn.Module):
        return Checkpoint(path, "module", dict(obj.state_dict()), obj)
    notes: list[str] = []
    return Checkpoint(path, "state_dict", _flatten(obj, path, notes), notes=notes)


def _read_exported(path: Path, names: list[str], trust: bool) -> Checkpoint:
    if trust:
        try:
            program = torch.export.load(str(path))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path}: unreadable torch.export program ({str(e).splitlines()[0]})") from None
        module = program.module()
        return Checkpoint(path, "exported", dict(module.state_dict()), module)
    # without trust, read the weights only: raw bytes described by a JSON config, no unpickling
    try:
        from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE as dtypes
    except ImportError:  # pragma: no cover - private name moved
        dtypes = {}
    state: dict[str, Tensor] = {}
    try:
        with zipfile.ZipFile(path) as z:
            cfg_name = next(n for n in names if n.endswith("data/weights/model_weights_config.json"))
            prefix = cfg_name[: -len("model_weights_config.json")]
            for fqn, entry in json.loads(z.read(cfg_name))["config"].items():
                meta = entry["tensor_meta"]
                if entry.get("use_pickle") or meta["dtype"] not in dtypes:
                    raise CheckpointError(f"{path}: weight {fqn!r} of this .pt2 program is pickled; pass "
                                          "--trust-checkpoint if you trust its source")
                raw = bytearray(z.read(prefix + entry["path_name"]))
                flat = torch.frombuffer(raw, dtype=dtypes[meta["dtype"]]) if raw else torch.empty(0)
                size = [d["as_int"] for d in meta["sizes"]]
                stride = [d["as_int"] for d in meta["strides"]]
                state[fqn] = flat.as_strided(size, stride, meta["storage_offset"]["as_int"]).clone()
    except (StopIteration, KeyError, TypeError, AttributeError, json.JSONDecodeError, RuntimeError, ValueError,
            zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: cannot read the weights of this .pt2 program ({e})") from None
    return Checkpoint(path, "exported", state)


# ----------------------------------------------------------------------------- user code
def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """`FILE.py:FUNC` or `package.module:FUNC` → the function (user code the user named)."""
    if ":" not in spec:
        raise CheckpointError(f"{what} {spec!r} must be FILE.py:FUNC or module:FUNC")
    target, func = spec.rsplit(":", 1)
    try:
        if target.endswith(".py"):
            file = Path(target)
            if not file.is_file():
                raise CheckpointError(f"{what} {spec!r}: no such file {target}")
            name = f"_lccompress_user_{file.stem}"
            mod_spec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(mod_spec)
            sys.path.insert(0, str(file.parent.resolve()))
            try:
                mod_spec.loader.exec_module(module)
            finally:
                sys.path.pop(0)
        else:
            module = importlib.import_module(target)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - user code can raise anything
        raise CheckpointError(f"{what} {spec!r}: importing it failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise CheckpointError(f"{what} {spec!r}: {target} has no function {func!r}")
    return fn


def call_factory(spec: str) -> nn.Module:
    """The nn.Module that the user's `--model FILE.py:FUNC` / `module:FUNC` returns."""
    fn = load_callable(spec, "--model")
    try:
        model = fn()
    except Exception as e:  # noqa: BLE001 - user code
        raise CheckpointError(f"--model {spec!r} raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"--model {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile


def _strip(key: str) -> str:
    while True:
        p = next((p for p in PREFIXES if key.startswith(p)), None)
        if p is None:
            return key
        key = key[len(p):]


def _fit(model: nn.Module, sd: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """(missing, unexpected) keys of `sd` for `model`; a missing key is fine when the model ties it
    to a present one (an output layer sharing the embedding's weight)."""
    own = model.state_dict()
    ptr = {k: (v.data_ptr(), tuple(v.shape)) for k, v in own.items()}
    present = {ptr[k] for k in sd if k in ptr}
    missing = [k for k in own if k not in sd and ptr[k] not in present]
    return missing, [k for k in sd if k not in own]


def build_model(ckpt: Checkpoint, factory: str | None) -> nn.Module | None:
    """The module to train: the checkpoint's own, or factory() with the checkpoint's weights loaded.
    Keys with `module.` / `_orig_mod.` prefixes are stripped when that makes them fit (noted in
    `ckpt.notes`); weights tied in the model may be stored once."""
    if factory is None:
        return ckpt.module
    model = call_factory(factory)
    sd = ckpt.state_dict
    missing, unexpected = _fit(model, sd)
    if missing or unexpected:
        stripped = {_strip(k): v for k, v in sd.items()}
        if len(stripped) == len(sd) and _fit(model, stripped) == ([], []):
            changed = sorted({k[: len(k) - len(_strip(k))] for k in sd if _strip(k) != k})
            ckpt.notes.append(f"{ckpt.path}: stripped the prefix {' and '.join(map(repr, changed))} from the "
                              "checkpoint's keys to fit the model")
            sd, missing, unexpected = stripped, [], []
            ckpt.state_dict = sd
    if missing or unexpected:
        hint = ""
        if any(_strip(k) != k for k in sd) or any(_strip(k) != k for k in model.state_dict()):
            hint = " (keys differ by a module. / _orig_mod. prefix: save model.module.state_dict())"
        raise CheckpointError(f"{ckpt.path} does not fit --model {factory!r}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}{hint}")
    try:
        model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt.path} does not fit --model {factory!r}: {str(e).splitlines()[-1].strip()}") from None
    return model
