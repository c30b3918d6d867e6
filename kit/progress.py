"""Progress bars that show in a terminal or a notebook and stay quiet in logs and CI.

    for item in progress_bar(items, desc="segment test", unit="study", enabled=progress): ...

A bar is drawn only when `enabled` and the output is a person's: standard error is a terminal, or the code runs
in a Jupyter kernel. Redirected to a file (a log, CI, `make demo > demo.log`) nothing is drawn, so logs keep
only the summaries. tqdm only: never imports torch or numpy.
"""

from __future__ import annotations

import sys


def interactive() -> bool:
    """Whether a person watches the output: stderr is a terminal, or this is a Jupyter kernel."""
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs):
    """`tqdm.auto.tqdm(iterable, **kwargs)`, disabled unless `enabled` and `interactive()`."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not (enabled and interactive()), **kwargs)
