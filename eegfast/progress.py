"""Progress bars for long work (training, prepare, predict, generate): tqdm on stderr, kept
quiet where nobody watches it.

When stderr is not a terminal (redirected to a file, as under Slurm, nohup or in CI), a bar
redraws at most every ``UNATTENDED_REFRESH_S`` seconds: with tqdm's 0.1 s each redraw adds a
carriage-return line of ~90 bytes to the log up to ten times a second, tens of MB in a day's
training run. ``TQDM_MININTERVAL`` in the environment, or a ``mininterval`` passed by the caller,
wins.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["UNATTENDED_REFRESH_S", "progress_bar"]

UNATTENDED_REFRESH_S = 60.0


def progress_bar(**kwargs: Any) -> tqdm:
    """``tqdm(**kwargs)`` on stderr; when stderr is not a terminal, refreshed at most every
    ``UNATTENDED_REFRESH_S`` seconds (unless ``TQDM_MININTERVAL`` or the caller sets it)."""
    from tqdm import tqdm

    try:
        interactive = bool(sys.stderr.isatty())
    except (AttributeError, ValueError, OSError):  # no stderr (pythonw), a closed one
        interactive = False
    if not interactive and "TQDM_MININTERVAL" not in os.environ:
        kwargs.setdefault("mininterval", UNATTENDED_REFRESH_S)
        # tqdm's monitor thread also refreshes a bar not shown for maxinterval (10 s)
        kwargs.setdefault("maxinterval", kwargs["mininterval"])
    return tqdm(**kwargs)
