"""Small helpers every layer shares: κ from a fraction or a count, weights as matrices, atomic writes,
copies of modules (TorchScript included)."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import tempfile
from typing import BinaryIO, Callable

import torch
from torch import Tensor, nn

from .errors import ConfigError


def kappa(n: int, *, keep: float | None = None, count: int | None = None, what: str = "weights") -> int:
    """κ of n units: `count` itself (1 ≤ count ≤ n), or round(keep·n) clamped to [1, n]."""
    if count is not None:
        if count > n:
            raise ConfigError(f"count={count} is more than the {n} {what} it applies to")
        return count
    return max(1, min(n, round(keep * n)))


def as_matrix(w: Tensor, what: str = "this") -> Tensor:
    """A weight (out, *rest) as the matrix (out, prod(rest)); conv kernels become (out, in·kh·kw)."""
    if w.dim() < 2:
        raise ConfigError(f"{what} needs a weight with at least 2 dimensions, got shape {tuple(w.shape)}")
    return w.reshape(w.shape[0], -1)


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None], mode: int = 0o644) -> None:
    """Write `data` (bytes, or a function writing to a binary file) to a temp file in path's
    directory, fsync it, then os.replace: a crash never leaves a half-written file at `path`."""
    path = os.fspath(path)
    folder, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{base}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def copy_module(model: nn.Module) -> nn.Module:
    """An independent copy; a TorchScript module goes through save/load (deepcopy would leave
    its parameters as non-leaf clones that an optimizer refuses)."""
    if isinstance(model, torch.jit.ScriptModule):
        buf = io.BytesIO()
        torch.jit.save(model, buf)
        buf.seek(0)
        return torch.jit.load(buf, map_location="cpu")
    return copy.deepcopy(model)
