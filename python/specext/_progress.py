"""Progress display: a tqdm bar on a terminal or in a notebook; plain lines otherwise.

Output redirected to a file or a pipe (a batch job's log) gets no carriage-return updates:
one line when a stage starts, then at most one line every ``SPECEXT_PROGRESS_INTERVAL``
seconds (default 30), then one when it ends, e.g.
``scoring: 384/1188 q (32%), 4.1 q/s, 3m16s left``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Iterable, Optional

INTERVAL = 30.0


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("SPECEXT_PROGRESS_INTERVAL", INTERVAL)))
    except ValueError:
        return INTERVAL


def _in_notebook() -> bool:
    """Whether we run in a Jupyter kernel (tqdm.auto shows a widget there)."""
    ip = sys.modules.get("IPython")
    if ip is None:
        return False
    try:
        shell = ip.get_ipython()
    except Exception:  # pragma: no cover - IPython internals
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _duration(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class PlainProgress:
    """tqdm's small interface (``update``, ``close``, iteration, ``with``) writing plain lines,
    at most one per ``interval`` seconds, to ``file`` (default ``sys.stderr``)."""

    def __init__(self, iterable: Optional[Iterable] = None, *, total: Optional[int] = None, initial: int = 0,
                 desc: str = "", unit: str = "it", disable: bool = False, file=None,
                 interval: Optional[float] = None, clock: Callable[[], float] = time.monotonic, **_ignored):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.desc, self.unit, self.disable = total, initial, desc, unit, disable
        self.file = file
        self.interval = _interval() if interval is None else interval
        self.clock = clock
        self.start = self.last = clock()
        self.initial = initial
        self.closed = False
        self.postfix = ""
        if not disable:
            self._line(started=True)

    def _line(self, started: bool = False, done: bool = False) -> None:
        f = self.file if self.file is not None else sys.stderr
        elapsed = self.clock() - self.start
        head = f"{self.desc}: " if self.desc else ""
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        parts = [f"{head}{count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        if done:
            parts.append(f"done in {_duration(elapsed)}")
        elif not started and rate > 0:
            parts.append(f"{rate:.3g} {self.unit}/s")
            if self.total is not None and self.total > self.n:
                parts.append(f"{_duration((self.total - self.n) / rate)} left")
        if self.postfix:
            parts.append(self.postfix)
        print(", ".join(parts), file=f, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable:
            return
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._line()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kw) -> None:
        items = dict(ordered_dict or {}, **kw)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.disable:
            self._line(done=True)

    def __iter__(self):
        for x in self.iterable:
            yield x
            self.update(1)
        self.close()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Optional[Iterable] = None, **kw):
    """A progress display taking tqdm's arguments (``total``, ``initial``, ``desc``, ``unit``,
    ``disable``, ``leave``): tqdm when stderr is a terminal or in a notebook, else
    :class:`PlainProgress` (plain lines at most every 30 s)."""
    if kw.get("disable") or _is_terminal(sys.stderr) or _in_notebook():
        from tqdm.auto import tqdm

        return tqdm(iterable, **kw)
    return PlainProgress(iterable, **kw)
