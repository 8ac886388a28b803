"""Benchmark B3: a small causal LM (byte-level GPT-2, 3.26 M parameters) trained on the Python
standard library's own sources, then compressed through the command line by DC, DC + fine-tuning
and LC at the same optimizer budget; perplexity measured in onnxruntime on the exported files.

    python benchmarks/lm.py                   # the README table: about 30 minutes on 2 idle cores
    python benchmarks/lm.py --quick           # smoke run, about 3 minutes
    python benchmarks/lm.py --levels k16,keep0.5 --work lm/   # some levels; lm/ keeps the reference

Data: the stdlib's .py files (sysconfig's "stdlib", site-packages and test suites left out),
sorted by relative path, every 10th held out (3.11: 719 files, 11.4 MB / 80 files, 1.2 MB); each
split is concatenated as bytes (vocabulary 256), cut into sequences of 128 and thinned evenly to
its cap (4 MB / 32 KB). The numbers depend on the Python version's stdlib. Nothing is downloaded.

Reference: GPT2LMHeadModel(vocab 256, context 128, width 256, 4 layers, 4 heads) from its config,
trained in process (AdamW lr 1e-3, warm-up then cosine, batch 16, seed 0) and saved as a
state_dict in the work directory beside task.py (the factory and data function the CLI loads:
dict batches {input_ids, attention_mask, labels}, so the loss is the model's own and the metric
perplexity) and train.bin / eval.bin. Then, per level and method (dc, finetune, lc):
    python -m lccompress quantize ref.pt --codebook 16 --model task.py:make_model --data task.py:loaders
        --method lc --optimizer adamw --budget N --lr 1e-4 --steps S -o X.onnx --report X.json
Perplexity is the report's metric.onnx, bytes its artifact_bytes (the ONNX file); the reference
row is the dense model exported the same way. Sizing, 2 idle cores (2 threads: 1.7× faster than
1; with other work on the machine use --threads 1): a training step takes 0.51 s, a pass over the
held-out set 2.6 s; a CLI run costs ~18 s (DC), ~100 s (DC+FT), ~125 s (LC, which evaluates
after every step) at budget 150. lr 1e-4 was picked on k = 16 by held-out perplexity (at 1e-3
and 3e-4 LC fell behind DC + fine-tuning), so the figures lean optimistic. Goals: LC within 2 %
of the reference perplexity at k = 16, within 5 % at keep 50 %, and better than DC + fine-tuning
at every level.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from lccompress import api
from lccompress.artifact import export_onnx
from lccompress.modelio import Inputs

TASK = '''"""Model and data of benchmark B3 (written by benchmarks/lm.py)."""
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

HERE = Path(__file__).resolve().parent


def make_model():
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=128, n_embd=256, n_layer=4, n_head=4,
                                      use_cache=False))


def batch(rows):
    ids = torch.stack(rows)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def sequences(name, length=128):
    data = torch.frombuffer(bytearray((HERE / name).read_bytes()), dtype=torch.uint8).long()
    return list(data[: len(data) // length * length].view(-1, length))


def loaders():
    shuffle = torch.Generator().manual_seed(0)
    return {"train": DataLoader(sequences("train.bin"), 16, shuffle=True, generator=shuffle, collate_fn=batch),
            "eval": DataLoader(sequences("eval.bin"), 32, collate_fn=batch)}
'''

LEVELS = {  # name: (label, command and options)
    "k16": ("codebook k=16", ["quantize", "--codebook", "16"]),
    "k4": ("codebook k=4", ["quantize", "--codebook", "4"]),
    "keep0.5": ("keep 50 % (global)", ["prune", "--keep", "0.5"]),
    "keep0.2": ("keep 20 % (global)", ["prune", "--keep", "0.2"]),
    "rank64": ("rank 64", ["lowrank", "--rank", "64"]),
}
METHODS = {"dc": "DC", "finetune": "DC+FT", "lc": "LC"}
FULL = dict(train_kb=4096, eval_kb=32, ref_steps=800, budget=150, steps=10)
QUICK = dict(train_kb=512, eval_kb=8, ref_steps=40, budget=12, steps=3)
SKIP = {"site-packages", "test", "tests"}


def write_data(work: Path, train_kb: int, eval_kb: int) -> str:
    """train.bin and eval.bin: the stdlib's .py files split by file, each split concatenated in
    path order and thinned to its cap by taking evenly spaced windows of 128 bytes (so a small
    held-out set still spans all its files). Returns a digest of both."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                   if not SKIP & set(p.relative_to(root).parts))
    digest = hashlib.sha256()
    for name, names, kb in (("train.bin", [f for i, f in enumerate(files) if i % 10], train_kb),
                            ("eval.bin", files[::10], eval_kb)):
        data = b"".join((root / f).read_bytes() for f in names)
        rows, keep = len(data) // 128, kb * 1024 // 128
        starts = [128 * (i * rows // keep) for i in range(min(rows, keep))]
        out = b"".join(data[s: s + 128] for s in starts)
        (work / name).write_bytes(out)
        digest.update(out)
    return digest.hexdigest()[:16]


def load_task(path: Path):
    spec = importlib.util.spec_from_file_location("lm_task", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def train_reference(task, steps: int, lr: float, seed: int) -> tuple[torch.nn.Module, float]:
    """AdamW for `steps` steps, warm-up over the first 5 %, cosine to 0; seconds per step back."""
    torch.manual_seed(seed)
    model = task.make_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    loader, step, t0 = task.loaders()["train"], 0, time.perf_counter()
    while step < steps:
        for b in loader:
            loss = model(**b).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % max(1, steps // 10) == 0 or step == steps:
                el = time.perf_counter() - t0
                print(f"  reference step {step}/{steps}: loss {loss.item():.3f}, {el:.0f} s, "
                      f"{el / step:.3f} s/step", flush=True)
            if step == steps:
                break
    return model.eval(), (time.perf_counter() - t0) / steps


def reference(work: Path, task, a) -> tuple[Path, float, int, float]:
    """The reference checkpoint (trained, or reused from the work directory when its settings
    match), its perplexity in onnxruntime, its ONNX bytes, and the training seconds per step."""
    ckpt, meta_path = work / "ref.pt", work / "ref.json"
    meta = {"ref_steps": a.ref_steps, "data": a.data, "seed": a.seed, "lr": a.ref_lr}
    old = json.loads(meta_path.read_text()) if meta_path.exists() and ckpt.exists() else {}
    if {k: old.get(k) for k in meta} == meta:
        model = task.make_model()
        model.load_state_dict(torch.load(ckpt, weights_only=True))
        step_s = old["step_s"]
        print(f"reference reused from {ckpt} ({a.ref_steps} steps, {step_s:.3f} s/step when trained)")
    else:
        model, step_s = train_reference(task, a.ref_steps, a.ref_lr, a.seed)
        torch.save(model.state_dict(), ckpt)
        meta_path.write_text(json.dumps({**meta, "step_s": step_s}))
    data = task.loaders()
    _, _, metric = api.make_task(model.eval(), data)
    x = next(iter(data["eval"]))
    onnx = work / "ref.onnx"
    export_onnx(model, {}, [], Inputs((), {k: x[k][:1] for k in ("input_ids", "attention_mask")}), onnx)
    return ckpt, api.onnx_eval(onnx, data["eval"], metric), onnx.stat().st_size, step_s


def compress(work: Path, ckpt: Path, level: str, method: str, a, env: dict) -> dict:
    """One CLI run; its report with the wall time, or {"error": ...}."""
    task, out = work / "task.py", work / f"{level}-{method}"
    cmd, opts = LEVELS[level][1][0], LEVELS[level][1][1:]
    args = [cmd, str(ckpt), *opts, "--model", f"{task}:make_model", "--data", f"{task}:loaders",
            "--method", method, "--seed", str(a.seed), "--device", "cpu",
            "-o", f"{out}.onnx", "--report", f"{out}.json"]
    if method != "dc":
        args += ["--optimizer", "adamw", "--budget", str(a.budget), "--lr", str(a.lr), "--steps", str(a.steps)]
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "lccompress", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode:
        last = (r.stderr.strip() or r.stdout.strip() or "?").splitlines()[-1]
        return {"error": f"exit {r.returncode}: {last}", "wall": wall, "command": args}
    onnx_bytes = Path(f"{out}.onnx").stat().st_size
    return {**json.loads(Path(f"{out}.json").read_text()), "wall": wall, "onnx_bytes": onnx_bytes}


def table(a, rows: dict, ref_ppl: float, ref_bytes: int, step_s: float, total: float) -> None:
    print(f"\nB3: byte-level GPT-2 on the stdlib's .py files, torch {torch.__version__}, {a.threads} thread(s); "
          f"train {a.train_kb} KB, held out {a.eval_kb} KB; reference {a.ref_steps} steps ({step_s:.3f} s/step); "
          f"DC+FT and LC: AdamW lr {a.lr}, budget {a.budget} optimizer steps, LC {a.steps} steps\n")
    print("| level | method | perplexity (onnxruntime) | vs reference % | bytes on disk | wall s |")
    print("|---|---|---|---|---|---|")
    print(f"| reference | — | {ref_ppl:.4f} | 0.00 | {ref_bytes:,} | {a.ref_steps * step_s:.0f} |")
    ppl = {}
    for (level, method), r in rows.items():
        if "error" in r:
            print(f"| {LEVELS[level][0]} | {METHODS[method]} | failed ({r['error']}) | | | {r['wall']:.0f} |")
            continue
        ppl[level, method] = p = r["metric"]["onnx"]
        size = f"{r['artifact_bytes']:,}"
        if r["artifact_bytes"] != r["onnx_bytes"]:  # the report's count against the file's own size
            size += f" ({r['onnx_bytes']:,} .onnx)"
        print(f"| {LEVELS[level][0]} | {METHODS[method]} | {p:.4f} | {100 * (p / ref_ppl - 1):+.2f} | {size} | "
              f"{r['wall']:.0f} |")
    print(f"\ntotal wall time {total / 60:.1f} min\ncommand: python benchmarks/lm.py " + " ".join(sys.argv[1:]))
    if done := [r for r in rows.values() if "error" not in r]:
        print("last CLI run: " + done[-1]["command"])
    for text, key, limit in (("k=16 within 2 %", ("k16", "lc"), 2), ("keep 50 % within 5 %", ("keep0.5", "lc"), 5)):
        if key in ppl:
            d = 100 * (ppl[key] / ref_ppl - 1)
            print(f"goal LC {text} of the reference: {d:+.2f} % ({'met' if d <= limit else 'missed'})")
    both = [lv for lv, m in ppl if m == "lc" and (lv, "finetune") in ppl]
    if worse := [lv for lv in both if ppl[lv, "lc"] >= ppl[lv, "finetune"]]:
        print(f"goal LC better than DC+FT at every level: missed at {', '.join(worse)}")
    elif both:
        print("goal LC better than DC+FT at every level: met")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: less data, fewer steps, 3 levels")
    ap.add_argument("--work", type=Path, help="work directory, kept (default: a temporary one)")
    ap.add_argument("--budget", type=int, help="optimizer steps of each DC+FT and LC run")
    ap.add_argument("--steps", type=int, help="LC steps (each evaluates on the held-out set)")
    ap.add_argument("--ref-steps", type=int, help="optimizer steps of the reference")
    ap.add_argument("--ref-lr", type=float, default=1e-3)
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of DC+FT and LC")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levels", help=f"comma-separated subset of {','.join(LEVELS)}")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for k, v in (QUICK if a.quick else FULL).items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    levels = a.levels.split(",") if a.levels else (["k16", "keep0.5", "rank64"] if a.quick else list(LEVELS))
    if bad := [lv for lv in levels if lv not in LEVELS]:
        ap.error(f"unknown level(s) {bad}; choose from {', '.join(LEVELS)}")
    torch.set_num_threads(a.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    import transformers
    transformers.logging.set_verbosity_error()  # GPT2Config's default bos/eos ids are outside 256 bytes
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        (work / "task.py").write_text(TASK)
        a.data = write_data(work, a.train_kb, a.eval_kb)
        ckpt, ref_ppl, ref_bytes, step_s = reference(work, load_task(work / "task.py"), a)
        rows = {}
        for level in levels:
            for method in METHODS:
                rows[level, method] = r = compress(work, ckpt, level, method, a, env)
                print(f"  {level} {method}: " + (r.get("error") or f"perplexity {r['metric']['onnx']:.4f}, "
                      f"{r['artifact_bytes']:,} bytes") + f", {r['wall']:.0f} s", flush=True)
        (work / "results.json").write_text(json.dumps({f"{lv} {m}": r for (lv, m), r in rows.items()}, indent=1))
    table(a, rows, ref_ppl, ref_bytes, step_s, time.perf_counter() - t0)
    if any("error" in r for r in rows.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
