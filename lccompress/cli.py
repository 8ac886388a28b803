"""The `lccompress` command line: a thin Click layer over the Python API."""
import click


@click.group()
def main() -> None:
    """Compress trained PyTorch models."""
