"""Progress lines with a rate and an ETA, for the logs of long steps.

Why: a rule's log is what a user reads while a long step runs (and what a failed rule's message points to):
every long loop reports how far it is and when it will be done, at most every few seconds. A person who runs
a step by hand at a terminal also sees a progress bar (tqdm, on stderr, only when stderr is a terminal).

Use:
    progress = Progress("extract train", total=len(ids), unit="images", log=print)
    for ...: progress.advance()          # prints `extract train: 120/1200 images (40.0/s, ETA 27s)`
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from tqdm import tqdm

_PROGRESS_EVERY_S = 5.0

Log = Callable[[str], None]


class Progress:
    """Prints `label: done/total unit (rate/s, ETA ..s)` at most every few seconds, and once at the end."""

    def __init__(self, label: str, total: int, unit: str, log: Log) -> None:
        self.label, self.total, self.unit, self.log = label, total, unit, log
        self.done = 0
        self.start = self.last = time.monotonic()
        self.bar = tqdm(total=total, desc=label, unit=f" {unit}", disable=not sys.stderr.isatty(), leave=False)

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done += n
        self.bar.update(n)
        if self.done >= self.total:
            self.bar.close()
        now = time.monotonic()
        if now - self.last < _PROGRESS_EVERY_S and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate else float("inf")
        self.log(f"{self.label}: {self.done}/{self.total} {self.unit} ({rate:.1f}/s, ETA {eta:.0f}s){note}")
