"""Progress on stderr for the CLI's long silent steps (model load, rank over an index): a spinner with the
elapsed seconds, drawn only on a terminal. No dependencies (a client-only install has no tqdm)."""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

FRAMES = "|/-\\"


def stderr_is_tty() -> bool:
    """Whether stderr is a terminal (progress is drawn only there: never into a log file or a pipe)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


@contextlib.contextmanager
def spinner(message: str, enabled: bool, stream: TextIO | None = None, interval: float = 0.1) -> Iterator[None]:
    """Show `message` with a turning bar and the seconds so far on `stream` (stderr) while the block runs;
    the line is erased afterwards. `enabled` False: nothing is drawn and no thread is started."""
    if not enabled:
        yield
        return
    out = stream if stream is not None else sys.stderr
    stop = threading.Event()
    t0 = time.monotonic()
    width = [0]

    def draw() -> None:
        for frame in itertools.cycle(FRAMES):
            line = f"{frame} {message} {time.monotonic() - t0:.0f} s"
            out.write("\r" + line)
            out.flush()
            width[0] = len(line)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=draw, name="forvalue-spinner", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        out.write("\r" + " " * width[0] + "\r")
        out.flush()
