"""Real architectures through lccompress, and the CLI's start-up time.

    python benchmarks/real_models.py            # about 3 minutes on 2 cores
    python benchmarks/real_models.py --quick    # fewer training epochs, a smoke run

Table 1: each architecture of fixtures/realnets.py (Hugging Face GPT-2 LM and BERT classifier
built from configs, an LSTM + GRU tagger, a TorchScript module with an int argument) is trained
on its synthetic task (AdamW), saved as people save it (state_dict, or a TorchScript archive),
then compressed through `api.compress_checkpoint` — the same path as the CLI — by DC and by LC
(prune to 30 % per layer; codebook k = 4 per layer), each written as .safetensors and reloaded;
the LC artifact is exported to ONNX and run in onnxruntime at another batch size and sequence
length than the example's (max relative difference to torch). The metric is the one the
defaults pick (perplexity for the LM, accuracy otherwise), on the held-out batches.

Table 2: wall time of `lccompress --help` against `python -c "import torch"`, median of 5, same run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fixtures"))
import realnets  # noqa: E402

from lccompress import Codebook, Prune, Recipe, api  # noqa: E402
from lccompress.artifact import load_into_, verify_onnx  # noqa: E402
from lccompress.modelio import Inputs  # noqa: E402

NETS = ROOT / "fixtures" / "realnets.py"
OTHER = {  # inputs at another batch size (3) and length (11) than the examples'
    "gpt2": lambda: Inputs((), {"input_ids": realnets._tokens(3, 7)[:, :11],
                                "attention_mask": torch.ones(3, 11, dtype=torch.long)}),
    "bert": lambda: Inputs((), {"input_ids": realnets._tokens(3, 7)[:, :11],
                                "attention_mask": torch.ones(3, 11, dtype=torch.long)}),
    "tagger": lambda: Inputs((realnets._tokens(3, 7)[:, :11],)),
    "audio": lambda: Inputs((torch.randn(3, 57, generator=torch.Generator().manual_seed(3)), 16000)),
}


def _fresh(name: str) -> torch.nn.Module:
    return getattr(realnets, name)()


def table1(quick: bool, work: Path) -> None:
    epochs = 5 if quick else 40
    print("| model | params | scheme | reference | DC | LC | LC ONNX (ort) | ONNX max rel diff @ 3×11 "
          "| dense bytes | artifact bytes | ONNX bytes | time LC s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in ("gpt2", "bert", "tagger", "audio"):
        model = realnets.train_reference(_fresh(name), getattr(realnets, f"{name}_data")(), epochs=epochs)
        ckpt = work / f"{name}.pt"
        if name == "audio":
            torch.jit.save(model, ckpt)
        else:
            torch.save(model.state_dict(), ckpt)
        params = sum(p.numel() for p in model.parameters())
        dense = ckpt.stat().st_size
        for label, scheme in (("prune 30 %", Prune(keep=0.3)), ("codebook k=4", Codebook(k=4))):
            res = {}
            for method in ("dc", "lc"):
                job = api.CompressJob(
                    checkpoint=str(ckpt), build_recipe=lambda names, s=scheme: Recipe.single(names, s),
                    out=str(work / f"{name}-{method}.safetensors"), method=method,
                    model_spec=None if name == "audio" else f"{NETS}:{name}", data_spec=f"{NETS}:{name}_data",
                    steps=10 if not quick else 3, epochs=2, first_epochs=4, argv=[])
                t = time.perf_counter()
                res[method] = (api.compress_checkpoint(job), time.perf_counter() - t)
            lc, seconds = res["lc"]
            onnx = work / f"{name}.onnx"
            extra = {"example": f"{NETS}:audio_example"} if name == "audio" else {"data_spec": f"{NETS}:{name}_data"}
            exp = api.export(str(lc.artifact), str(onnx), f"{NETS}:{name}", **extra)
            back = load_into_(_fresh(name), lc.artifact)
            parity = verify_onnx(onnx, back, OTHER[name]())["max_rel"]
            m = lc.report["metric"]
            data, _, metric = api.make_task(back.eval(), getattr(realnets, f"{name}_data")())  # the defaults
            ort_val = api.onnx_eval(onnx, data["eval"], metric)
            fmt = (lambda v: f"{100 * v:.1f} %") if m["unit"] == "%" else (lambda v: f"{v:.3f}")
            print(f"| {name} | {params:,} | {label} | {fmt(m['reference'])} | "
                  f"{fmt(res['dc'][0].report['metric']['compressed'])} | {fmt(m['compressed'])} | {fmt(ort_val)} | "
                  f"{parity:.1e} | {dense:,} | {lc.report['artifact_bytes']:,} | {exp.bytes:,} | {seconds:.1f} |",
                  flush=True)


def table2() -> None:
    def median(cmd: list[str]) -> float:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    torch_s = median([sys.executable, "-c", "import torch"])
    help_s = median([sys.executable, "-m", "lccompress", "--help"])
    print("\n| command | median of 5, s | ratio |\n|---|---|---|")
    print(f"| python -c \"import torch\" | {torch_s:.2f} | 1.00 |")
    print(f"| python -m lccompress --help | {help_s:.2f} | {help_s / torch_s:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs and LC steps: a smoke run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"lccompress real-model benchmark, torch {torch.__version__}, 1 thread")
    with tempfile.TemporaryDirectory() as d:
        table1(args.quick, Path(d))
    table2()


if __name__ == "__main__":
    main()
