"""Resumable LC state: saved atomically after every step, so an interrupted run continues exactly."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import ConfigError
from .recipe import Recipe
from .util import atomic_write


def fingerprint(method: str, config: Any, recipe: Recipe, seed: int, shapes: Mapping[str, Any]) -> str:
    """sha256 of everything that decides a run's result: a state saved under other settings is refused."""
    spec = {"method": method, "config": asdict(config), "recipe": recipe.to_dict(), "seed": seed,
            "params": {n: list(s) for n, s in shapes.items()}}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


class LCState:
    """The state file `lc_state.pt` in a directory: weights, θ, λ, RNG, guard and history."""

    FILE = "lc_state.pt"

    def __init__(self, directory: str | Path, fingerprint: str, resume: bool) -> None:
        self.dir, self.fingerprint, self.resume = Path(directory), fingerprint, resume

    def load(self) -> dict | None:
        """The saved state when resuming and one exists, else None; refuses other settings' state."""
        path = self.dir / self.FILE
        if not self.resume or not path.exists():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable state is reported the same way
            raise ConfigError(f"{path}: unreadable LC state ({str(e).splitlines()[0]}); delete it to start over") from None
        if state.get("fingerprint") != self.fingerprint:
            raise ConfigError(f"{path} was written by a run with other settings; delete it or drop --resume")
        return state

    def save(self, state: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        state = {**state, "fingerprint": self.fingerprint}
        atomic_write(self.dir / self.FILE, lambda f: torch.save(state, f), mode=0o600)
