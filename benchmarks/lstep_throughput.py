"""Throughput of LC's L step against plain training of the same model on the same loader.

Plain: `for batch: zero_grad; model(**batch).loss.backward(); AdamW.step()`. The L step: the
same through lccompress's training loop (the NaN guard's chunks, progress callbacks, the proximal
pull toward Δ(θ) + λ/μ after every step, the loss accumulated on the device). Same model, same
batches, same optimizer; the ratio is L-step steps/s over plain steps/s (goal ≥ 0.9).

    python benchmarks/lstep_throughput.py                       # the CPU, the B3 GPT-2 shape
    python benchmarks/lstep_throughput.py --device cuda --amp bf16
"""

from __future__ import annotations

import argparse
import time

import torch

from lccompress.train import Pull, Stream, train_epochs


def make(width: int, layers: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=128, n_embd=width, n_layer=layers, n_head=4,
                                      use_cache=False))


def batches(n: int, batch: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (batch, 128), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def plain(model, data, device, amp) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctx = (lambda: torch.autocast(device.type, torch.bfloat16)) if amp == "bf16" else None
    t = time.perf_counter()
    for b in data:
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        opt.zero_grad(set_to_none=True)
        if ctx:
            with ctx():
                loss = model(**b).loss
        else:
            loss = model(**b).loss
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(data) / (time.perf_counter() - t)


def lstep(model, data, device, amp) -> float:
    compressed = [p for n, p in model.named_parameters() if p.dim() >= 2]
    ids = {id(p) for p in compressed}
    dense = [p for p in model.parameters() if id(p) not in ids]
    targets = [p.detach().clone() for p in compressed]
    t = time.perf_counter()
    train_epochs(model, Stream(data), [(compressed, 1e-4), (dense, 1e-4)], iterations=len(data), loss_fn="model",
                 device=device, optimizer="adamw", pull=Pull(compressed, targets, 1e-2), amp=amp,
                 on_step=lambda n: None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(data) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="off", choices=["off", "bf16"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    data = batches(a.steps, a.batch, device)
    rows = []
    for rep in range(2):  # interleaved, twice: the machine is shared and noisy
        for name, fn in (("plain", plain), ("L step", lstep)):
            model = make(a.width, a.layers).to(device).train()
            fn(model, data[:3], device, a.amp)  # warm-up
            rows.append((name, fn(model, data, device, a.amp)))
    best = {n: max(v for m, v in rows if m == n) for n in ("plain", "L step")}
    print(f"GPT-2 {a.layers}×{a.width}, batch {a.batch}×128, {a.steps} steps, device {a.device}, amp {a.amp}, "
          f"{a.threads} thread(s); best of 2")
    print("| loop | steps/s | ratio |")
    print("|---|---|---|")
    for n in ("plain", "L step"):
        print(f"| {n} | {best[n]:.2f} | {best[n] / best['plain']:.2f} |")


if __name__ == "__main__":
    main()
