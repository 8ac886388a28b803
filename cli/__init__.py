"""The `lccompress` command line (installed as `lccompress.cli`): Click options over `lccompress.api`,
rendered with rich. `main` is the console script and `python -m lccompress`."""

from .app import main

__all__ = ["main"]
