"""Silencing torch's exporters: they log, warn and print pages of graph on the way, and mq turns their failures
into one paragraph of its own, so their chatter stays out of the user's output."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def silenced(*loggers: str) -> Iterator[None]:
    """Within the block: the named loggers at ERROR, warnings ignored, stderr swallowed; all restored after."""
    found = [logging.getLogger(name) for name in loggers]
    levels = [lg.level for lg in found]
    for lg in found:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(found, levels):
            lg.setLevel(level)
