"""Ctrl-C that is never lost.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT arrives. When that is
inside a finalizer or a weakref callback (garbage collection of SQLAlchemy's or torch's objects
runs them at arbitrary moments), the exception is printed as "Exception ignored in ..." and
dropped: the benchmark or the search would go on as if Ctrl-C had not been pressed (found when a
tuning test sent SIGINT and the search ran to the end). Inside :func:`catching_interrupts` the
SIGINT handler also records the signal, and :func:`check`, called at safe points (every training
iteration, between trials, while waiting for parallel runs), raises ``KeyboardInterrupt`` again
if one was recorded.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_pending = False


def _handler(signum, frame) -> None:
    global _pending
    _pending = True
    raise KeyboardInterrupt


@contextmanager
def catching_interrupts(signum: int = signal.SIGINT) -> Iterator[None]:
    """Install the recording handler of ``signum`` (SIGINT; a worker process: SIGTERM) for the
    ``with`` block (the main thread only, and only where the signal is not ignored, e.g. not
    SIGINT in a worker process); restore the previous one after it."""
    global _pending
    installed, previous = False, None
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signum)
        if previous is not signal.SIG_IGN:
            signal.signal(signum, _handler)
            installed = True
    _pending = False
    try:
        yield
    finally:
        if installed:
            signal.signal(signum, previous)
        _pending = False


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a SIGINT was received (even one whose exception was
    swallowed by a finalizer); cheap enough for every training iteration."""
    if _pending:
        raise KeyboardInterrupt


__all__ = ["catching_interrupts", "check"]
