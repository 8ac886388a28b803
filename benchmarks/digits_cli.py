"""Benchmark B1 through the command line, with the CLI's defaults: only --steps 40 --epochs 5
beyond them. For each seed it saves the reference state_dict, writes a --data function for that
seed's split, and runs `lccompress prune|quantize|lowrank` in-process; test error from the reports.

    python benchmarks/digits_cli.py [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from click.testing import CliRunner

from lccompress import digits
from lccompress.cli import main as cli

TASKS = {
    "prune": ["prune", "--keep", "0.05"],
    "quant": ["quantize", "--codebook", "2"],
    "lowrank": ["lowrank", "--rank", "8", "--exclude", "fc3.weight"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    a = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in a.seeds.split(",")]
    errs: dict[str, list[float]] = {t: [] for t in TASKS}
    ref_errs: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for seed in seeds:
            ckpt = d / f"ref{seed}.pt"
            torch.save(digits.train_reference(seed).state_dict(), ckpt)
            (d / f"data{seed}.py").write_text(
                f"from lccompress import digits\n\ndef loaders():\n    return digits.loaders({seed})\n")
            for task, args in TASKS.items():
                rep = d / f"{task}{seed}.json"
                cmd = [*args[:1], str(ckpt), *args[1:], "--model", "lccompress.digits:MLP", "--data",
                       f"{d / f'data{seed}.py'}:loaders", "--steps", "40", "--epochs", "5",
                       "--seed", str(seed), "--device", "cpu", "-o", str(d / f"{task}{seed}.safetensors"),
                       "--report", str(rep)]
                r = CliRunner().invoke(cli, cmd)
                if r.exit_code != 0:
                    raise SystemExit(r.output)
                m = json.loads(rep.read_text())["metric"]
                errs[task].append(100 * (1 - m["compressed"]))
            ref_errs.append(100 * (1 - m["reference"]))
    print(f"B1 through the CLI (defaults + --steps 40 --epochs 5), test error, mean of seeds {a.seeds}")
    print("| task | reference | LC (CLI) |")
    print("|---|---|---|")
    for t, v in errs.items():
        print(f"| {t} | {statistics.fmean(ref_errs):.2f} % | {statistics.fmean(v):.2f} % |")


if __name__ == "__main__":
    main()
