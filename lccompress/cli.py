"""The `lccompress` command line: a thin Click layer over the Python API."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from .errors import LCError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lccompress")
def main() -> None:
    """Compress trained PyTorch models: direct compression, then the LC algorithm."""


@main.command()
@click.option("--steps", default=20, show_default=True, help="LC steps.")
@click.option("--seed", default=0, show_default=True, help="Seed of the data split and training.")
def demo(steps: int, seed: int) -> None:
    """Train the digits MLP, then compress it by DC and LC and print a table.

    Example: lccompress demo --steps 20
    """
    import torch

    from . import Codebook, LCConfig, LowRank, Prune, Recipe, compress, digits
    from .train import evaluate

    torch.set_num_threads(1)
    console = Console()
    try:
        data = digits.loaders(seed)
        with console.status("training the reference 64-300-100-10 MLP on scikit-learn's digits"):
            ref = digits.train_reference(seed, data=data)
        layers = ["fc1.weight", "fc2.weight", "fc3.weight"]
        tasks = {
            "prune, keep 5 % jointly": Recipe.single(layers, Prune(keep=0.05), joint=True),
            "codebook k = 2 per layer": Recipe.single(layers, Codebook(k=2)),
            "rank 8 (fc1, fc2)": Recipe.single(layers[:2], LowRank(8)),
        }
        cfg = LCConfig(steps=steps, epochs=5, first_epochs=10)
        table = Table(title=f"digits MLP, test error (seed {seed}, {steps} LC steps)")
        for col in ("compression", "ratio", "DC", "LC", "LC time"):
            table.add_column(col, justify="right" if col != "compression" else "left")
        ref_err = 100 * (1 - evaluate(ref, data["eval"], torch.device("cpu"))[0])
        for name, recipe in tasks.items():
            dc = compress(ref, recipe, data, method="dc", device="cpu", seed=seed)
            with console.status(f"LC: {name}"):
                lc = compress(ref, recipe, data, config=cfg, device="cpu", seed=seed)
            table.add_row(name, f"{lc.ratio:.1f}×", f"{100 * (1 - dc.metric):.2f} %",
                          f"{100 * (1 - lc.metric):.2f} %", f"{lc.timings['total']:.1f} s")
        console.print(f"reference test error: {ref_err:.2f} %")
        console.print(table)
    except LCError as e:
        raise click.ClickException(str(e)) from None
