"""A job's progress as the pipeline reports it: the current stage, its fraction, the cancel check, the seconds.

Handed to the models, the surface extraction and the post-processing, so that each can report progress and
stop between chunks of work without knowing who listens (the CLI's printer, the worker's events, a batch).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from .errors import Cancelled

ProgressFn = Callable[[str, float, str], None]


class Stages:
    """Progress + cancellation + per-stage timing, handed to models and extraction code."""

    def __init__(self, progress: Optional[ProgressFn], cancelled: Optional[Callable[[], bool]]):
        self._progress = progress
        self._cancelled = cancelled
        self.seconds: dict[str, float] = {}
        self._stage, self._t0 = None, 0.0

    def begin(self, stage: str, message: str = "") -> None:
        self.end()
        self._stage, self._t0 = stage, time.perf_counter()
        self.update(0.0, message)

    def update(self, fraction: float, message: str = "") -> None:
        self.check()
        if self._progress and self._stage:
            self._progress(self._stage, float(fraction), message)

    def check(self) -> None:
        if self._cancelled and self._cancelled():
            raise Cancelled()

    @property
    def current(self) -> Optional[str]:
        return self._stage

    def end(self) -> None:
        if self._stage:
            self.seconds[self._stage] = self.seconds.get(self._stage, 0.0) + time.perf_counter() - self._t0
            self._stage = None
