"""AC/DC: alternating compressed / decompressed training (Peste, Iofinova, Vladu, Alistarh,
NeurIPS 2021), as a method of the LC family's run (`lc.compress(method="acdc")`).

From a trained model, the budget of T optimizer steps is cut into 2·cycles + 2 equal shares:

    for c = 1 … cycles:
        compressed phase     θ ← Π(w) (the scheme's C step at the current weights: for pruning the
                             magnitude mask); train θ's free parts (kept values, codebook entries,
                             factors) and the dense parameters, the mask fixed           one share
        decompressed phase   w ← Δ(θ); train every weight, pruned ones regrow from 0     one share
    final compressed phase   θ ← Π(w); train θ's free parts                              two shares
    return Δ(θ)

The learning rate follows one cosine from lr over the whole budget (phases do not restart it).
The C step is the recipe's, so any scheme works; the paper's setting is magnitude pruning.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .errors import ConfigError
from .lc_config import Result, split
from .train import cosine, train_epochs


class ACDC:
    """The `acdc` method, mixed into the LC family's run class (`lc._Run`), whose pieces it uses:
    cfg, plan, params, compressed, dense, stream, loss, device, guard, tally, cstep, deltas,
    weights, tune, evaluate, gap, record, finish, progress."""

    def acdc(self: Any) -> Result:
        cfg = self.cfg
        if self.plan is None or self.lstep is not None or isinstance(self.model, torch.jit.ScriptModule):
            raise ConfigError("acdc needs its budget in optimizer steps (a training loader with a len(), or "
                              "--budget), the default L step, and a Python module (not TorchScript)")
        cycles = cfg.cycles
        total = sum(self.plan)
        shares = split(total, [1.0] * (2 * cycles) + [2.0])
        if min(shares) < 1:
            raise ConfigError(f"a budget of {total} optimizer steps is too small for {cycles} AC/DC cycles "
                              f"(each phase needs at least one step); lower cycles or raise the budget")
        done = 0
        thetas = None
        for k, n in enumerate(shares):
            offset = done

            def factor(e: float, offset: int = offset) -> float:
                return cosine(offset + e, total)

            if k % 2 == 0:  # compressed: a C step at the current weights, then θ's free parts train
                thetas = self.cstep(self.weights(), thetas, cfg.mu0)
                thetas, task = self.tune(thetas, n, None, cfg.lr, f"AC/DC compressed phase {k // 2 + 1}",
                                         lr_factor=factor)
                d = self.deltas(thetas)
                metric = self.evaluate(d)
                with torch.no_grad():
                    for name, t in d.items():
                        self.params[name].copy_(t)
                gap, phase = 0.0, "acdc-compressed"
            else:  # decompressed: every weight trains from Δ(θ), pruned ones included
                self.model.train()
                t = time.perf_counter()
                task = train_epochs(self.trainer(), self.stream, [(self.compressed + self.dense, cfg.lr)],
                                    iterations=n, loss_fn=self.loss, device=self.device, optimizer=cfg.optimizer,
                                    momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                                    lr_factor=factor, guard=self.guard, where=f"AC/DC decompressed phase {k // 2 + 1}",
                                    on_step=self.progress(n), amp=cfg.amp, tally=self.tally)
                self.t["lstep"] += time.perf_counter() - t
                metric = self.evaluate({})
                gap, phase = self.gap(self.deltas(thetas)), "acdc-dense"
            done += n
            self.record(step=k, mu=0.0, lr=cfg.lr * factor(0), loss=task, gap=gap, metric=metric, phase=phase)
        return self.finish(thetas, "acdc")


__all__ = ["ACDC"]
