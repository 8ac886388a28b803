"""Fuzzing lccompress's readers: N mutations of a compressed artifact, a multi-level file and an
ONNX export (byte flips, truncations, metadata edits resealed with a valid checksum — for ONNX
a valid `lccompress.seal`; see fixtures/fuzzing.py),
and the readers' verdicts.

    python benchmarks/fuzz.py --n 10000      # the long run: about 17 s of CPU on one thread
                                             # (27–47 s wall on a busy 2-core machine)
    python benchmarks/fuzz.py --n 500        # a quick one (about 1 s)

Prints one row per kind: tried / rejected cleanly / read the same / different (silent corruption)
/ different after a resealed metadata edit / unhandled (a traceback), up to 20 examples, and the
time taken.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "fixtures"), str(ROOT / "tests" / "artifact")]
import fuzzing  # noqa: E402
from test_fuzz import files  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000, help="mutations per kind of file")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as d:
        counts = fuzzing.fuzz(files(Path(d)), args.n, args.seed, Path(d))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    examples = counts.pop("_examples")
    keys = ["tried", "rejected", "same", "different", "different after a resealed edit", "unhandled"]
    print("| file | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1))
    for kind, c in counts.items():
        print(f"| {kind} | " + " | ".join(f"{c[k]:,}" for k in keys) + " |")
    for e in examples:
        print("  " + e)
    print(f"{wall:.1f} s ({cpu:.1f} s of CPU), {args.n:,} mutations per kind")


if __name__ == "__main__":
    main()
