"""Progress display of the benchmark: tqdm bars on a terminal; elsewhere (a log file, a CI
console) plain lines with no cursor-control escape codes, written only when something changed:
at once for a finished item of a bar that counts runs (``each_item``), else at most every
:data:`LINE_PERIOD_S` seconds."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

#: least seconds between two progress lines when the output is not a terminal (but see
#: ``each_item``)
LINE_PERIOD_S = 30.0


class LineProgress:
    """Iterate ``iterable``, writing ``desc: i/n, elapsed, postfix`` to ``stream`` when the count
    or the postfix changed since the last line (never the same line twice; the elapsed time
    alone is no change): with ``each_item``, at once when the count changed; otherwise (and for
    a postfix change) at most once every ``period`` seconds; and once at the end
    (``final_line``) if the last line is not already the final one. Offers tqdm's
    ``set_postfix`` / ``set_postfix_str`` / ``refresh`` (a line while waiting for a slow item,
    if one is due). ``clock``: the time source (seconds; tests pass a fake one)."""

    def __init__(
        self,
        iterable: Iterable,
        desc: str,
        stream: TextIO | None = None,
        period: float = LINE_PERIOD_S,
        final_line: bool = True,
        total: int | None = None,
        each_item: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.iterable = iterable
        self.desc = desc
        self.stream = stream
        self.period = period
        self.final_line = final_line
        self.each_item = each_item
        self.clock = clock
        self.postfix = ""
        self._start: float | None = None
        self._last = 0.0  # when the last line was written
        self._done = 0
        self._written: tuple[int, str] | None = None  # (count, postfix) of the last line
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

    def _write(self) -> None:
        assert self._start is not None
        stream = self.stream if self.stream is not None else sys.stderr
        total = f"/{self.total}" if self.total is not None else ""
        tail = f", {self.postfix}" if self.postfix else ""
        now = self.clock()
        stream.write(f"{self.desc}: {self._done}{total}, {now - self._start:.0f} s{tail}\n")
        stream.flush()
        self._last = now
        self._written = (self._done, self.postfix)

    def refresh(self) -> None:
        """Write a line if one is due (see the class; also while waiting for the next item)."""
        last = self._written or (0, "")  # nothing written yet: no count, no postfix
        if self._start is None or last == (self._done, self.postfix):
            return
        if (self.each_item and last[0] != self._done) or self.clock() - self._last >= self.period:
            self._write()

    def __iter__(self) -> Iterator:
        self._start = self._last = self.clock()
        self._done = 0
        self._written = None
        for item in self.iterable:
            yield item
            self._done += 1
            self.refresh()
        if self.final_line and self._written != (self._done, self.postfix):
            self._write()


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
    each_item: bool = False,
):
    """A tqdm bar when ``stream`` (default stderr) is a terminal, :class:`LineProgress` lines
    otherwise (a per-epoch bar, ``leave=False``, writes no final line; ``each_item``: a line for
    every finished item, e.g. runs), nothing when ``enabled`` is false. ``total``: the number of
    items of an iterable without ``len``."""
    if not enabled:
        return _Silent(iterable)
    if is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, leave=leave, position=position, file=stream, total=total)
    return LineProgress(
        iterable, desc, stream=stream, final_line=leave, total=total, each_item=each_item
    )
