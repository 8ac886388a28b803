"""LC under torchrun: two gloo processes on the CPU train with DistributedDataParallel on halves of
the data, keep θ identical, and only process 0 writes; the result matches one process with the
same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

DATA = """
import torch
from torch.utils.data import DataLoader, TensorDataset

def _split():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1024, 12, generator=g)
    y = (X[:, :3].sum(1) > 0).long() + (X[:, 3] > 1).long()
    return X, y

def loaders(batch=32):
    X, y = _split()
    return {"train": DataLoader(TensorDataset(X[:384], y[:384]), batch_size=batch, shuffle=True),
            "eval": DataLoader(TensorDataset(X[384:], y[384:]), batch_size=320)}

def loaders_global():  # one process, the global batch of two processes of 32
    return loaders(64)

def make():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
"""

# each process writes a digest of its θ after every C step, through the library
DIGESTS = """
import sys, torch
from lccompress import Prune, Recipe, LCConfig, compress, distributed
sys.path.insert(0, sys.argv[1])
import task
out = sys.argv[2]
seen = []
import lccompress.lc as lc
orig = lc._Run.cstep
def cstep(self, *a, **k):
    th = orig(self, *a, **k)
    seen.append(distributed.digest(th))
    return th
lc._Run.cstep = cstep
model = task.make()
recipe = Recipe.single(["0.weight", "2.weight"], Prune(keep=0.2))
cfg = LCConfig(steps=3, epochs=1.5, first_epochs=1.5)
r = compress(model, recipe, task.loaders(), config=cfg, device="cpu", seed=0)
assert r.history[-1].phase == "tail"
seen.append(distributed.digest(r.thetas))  # after LC's tail, trained with gradients averaged over processes
open(f"{out}/digests.{distributed.rank()}", "w").write("\\n".join(seen))
# interrupted after step 1 on every process (mid-pass: 1.5 epochs per L step), then resumed
def stop(rec):
    if rec.step == 1:
        raise KeyboardInterrupt
try:
    compress(model, recipe, task.loaders(), config=cfg, device="cpu", seed=0, state_dir=f"{out}/state", callback=stop)
except KeyboardInterrupt:
    pass
again = compress(model, recipe, task.loaders(), config=cfg, device="cpu", seed=0, state_dir=f"{out}/state",
                 resume=True)
same = all(torch.equal(a, b) for a, b in zip(r.model.state_dict().values(), again.model.state_dict().values()))
open(f"{out}/resumed.{distributed.rank()}", "w").write(str(same))
# AC/DC: dense phases in DistributedDataParallel, compressed phases with averaged gradients
a = compress(model, recipe, task.loaders(), method="acdc", config=LCConfig(steps=2, budget=24, cycles=2), device="cpu",
             seed=0)
open(f"{out}/acdc.{distributed.rank()}", "w").write(f"{distributed.digest(a.thetas)} {a.budget['samples']}")
# CrAM: each process on its shard, gradients averaged
c = compress(model, recipe, task.loaders(), method="cram", config=LCConfig(steps=2, budget=24), device="cpu", seed=0)
open(f"{out}/cram.{distributed.rank()}", "w").write(f"{distributed.digest(c.thetas)} {c.budget['samples']}")
# Frank-Wolfe: each process on its shard, gradients averaged before the LMO
f = [compress(model, recipe, task.loaders(), method=m, sfw={"epochs": 2}, device="cpu", seed=0) for m in ("sfw", "fw-grow")]
open(f"{out}/fw.{distributed.rank()}", "w").write(" ".join(distributed.digest(r.thetas) for r in f))
"""


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("torchrun")
    (d / "task.py").write_text(DATA)
    (d / "digests.py").write_text(DIGESTS)
    sys.path.insert(0, str(d))
    try:
        import task as t  # noqa: PLC0415
        torch.save(t.make().state_dict(), d / "ref.pt")
    finally:
        sys.path.remove(str(d))
        sys.modules.pop("task", None)
    return d


def test_theta_is_identical_on_both_processes_after_every_c_step(task):
    p = torchrun(str(task / "digests.py"), str(task), str(task), cwd=task)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (task / "digests.0").read_text().split(), (task / "digests.1").read_text().split()
    # DC, three LC C steps and the θ after the tail: the same bytes on both processes
    assert len(a) == 5 and a == b
    # interrupted mid-run and resumed from process 0's saved state: the same bytes as unbroken
    assert (task / "resumed.0").read_text() == "True" and (task / "resumed.1").read_text() == "True"
    # AC/DC: the same θ on both processes, 24 steps of 2 × 32 samples
    a, b = (task / "acdc.0").read_text().split(), (task / "acdc.1").read_text().split()
    assert a == b and a[1] == str(24 * 2 * 32)
    # CrAM: the same θ on both processes, each on its half of the data
    a, b = (task / "cram.0").read_text().split(), (task / "cram.1").read_text().split()
    assert a == b and a[1] == str(24 * 2 * 32)
    assert (task / "fw.0").read_text() == (task / "fw.1").read_text()  # SFW and fw-grow


def test_cli_under_torchrun_writes_once_and_matches_one_process(task):
    common = ["prune", "ref.pt", "--keep", "0.2", "--model", "task.py:make", "--steps", "4", "--epochs", "2",
              "--device", "cpu", "--seed", "0"]
    p = torchrun("-m", "lccompress", *common, "--data", "task.py:loaders", "-o", "two.safetensors",
                 "--report", "two.json", cwd=task)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("bytes on disk") == 1  # process 0 alone reports
    assert not (task / "two.safetensors.lcstate").exists()
    one = subprocess.run([sys.executable, "-m", "lccompress", *common, "--data", "task.py:loaders_global",
                          "-o", "one.safetensors", "--report", "one.json"], cwd=task, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two_r, one_r = json.loads((task / "two.json").read_text()), json.loads((task / "one.json").read_text())
    assert two_r["budget"]["processes"] == 2 and one_r["budget"]["processes"] == 1
    assert two_r["budget"]["steps"] == one_r["budget"]["steps"]  # 6 batches of 64, or 6 of 32 on each process
    assert two_r["budget"]["samples"] == one_r["budget"]["samples"]
    assert abs(two_r["metric"]["compressed"] - one_r["metric"]["compressed"]) <= 0.01 + 1e-9
    # the artifact holds a 20 % pruning of the two weight matrices
    from safetensors.torch import load_file  # noqa: PLC0415

    sd = torch.load(task / "ref.pt", weights_only=True)
    assert two_r["layers"][0]["summary"]["kept"] == round(0.2 * (sd["0.weight"].numel() + sd["2.weight"].numel()))
    assert (task / "two.safetensors").stat().st_size == two_r["artifact_bytes"] and load_file(task / "two.safetensors")
