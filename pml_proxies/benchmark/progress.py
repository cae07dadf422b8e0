"""Progress display of the benchmark: tqdm bars on a terminal; elsewhere (a log file, a CI
console) one plain line every few seconds, with no cursor-control escape codes."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

#: seconds between two progress lines when the output is not a terminal
LINE_PERIOD_S = 5.0


class LineProgress:
    """Iterate ``iterable``, writing ``desc: i/n, elapsed, postfix`` to ``stream`` at most once
    every ``period`` seconds (and once at the end). Offers tqdm's ``set_postfix`` /
    ``set_postfix_str`` / ``refresh`` (a line while waiting for a slow item, if one is due)."""

    def __init__(
        self,
        iterable: Iterable,
        desc: str,
        stream: TextIO | None = None,
        period: float = LINE_PERIOD_S,
        final_line: bool = True,
        total: int | None = None,
    ) -> None:
        self.iterable = iterable
        self.desc = desc
        self.stream = stream
        self.period = period
        self.final_line = final_line
        self.postfix = ""
        self._start: float | None = None
        self._last = 0.0
        self._done = 0
        self._written = -1  # the count of the last line written
        self.total: int | None = total
        if total is None:
            try:
                self.total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                pass

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self.postfix = text

    def _write(self, done: int, start: float) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        total = f"/{self.total}" if self.total is not None else ""
        tail = f", {self.postfix}" if self.postfix else ""
        stream.write(f"{self.desc}: {done}{total}, {time.time() - start:.0f} s{tail}\n")
        stream.flush()

    def refresh(self) -> None:
        """Write a line if ``period`` seconds passed since the last one (while waiting for the
        next item)."""
        if self._start is not None and time.time() - self._last >= self.period:
            self._write(self._done, self._start)
            self._last = time.time()
            self._written = self._done

    def __iter__(self) -> Iterator:
        self._start = self._last = time.time()
        self._done = 0
        self._written = -1
        for item in self.iterable:
            yield item
            self._done += 1
            self.refresh()
        if self.final_line and self._written != self._done:  # not twice the same count
            self._write(self._done, self._start)


class _Silent:
    """No display (progress disabled)."""

    def __init__(self, iterable: Iterable) -> None:
        self.iterable = iterable

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        pass

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        pass

    def refresh(self) -> None:
        pass

    def __iter__(self) -> Iterator:
        return iter(self.iterable)


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(
    iterable: Iterable,
    desc: str,
    enabled: bool = True,
    position: int = 0,
    leave: bool = True,
    stream: TextIO | None = None,
    total: int | None = None,
):
    """A tqdm bar when ``stream`` (default stderr) is a terminal, :class:`LineProgress` lines
    otherwise (a per-epoch bar, ``leave=False``, writes only its periodic lines), nothing when
    ``enabled`` is false. ``total``: the number of items of an iterable without ``len``."""
    if not enabled:
        return _Silent(iterable)
    if is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, leave=leave, position=position, file=stream, total=total)
    return LineProgress(iterable, desc, stream=stream, final_line=leave, total=total)
