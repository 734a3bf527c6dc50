"""A job as a client sees it, and what the two transports share: the events its reader threads queue, the log.

Standard library only. :meth:`Transport.poll` never blocks: Blender calls it from a timer on the main thread.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import queue
import shutil
import tempfile
import time
from pathlib import Path

from ..protocol import CANCELLED, CANCELLED_CODE, DONE, ERROR, ERROR_EVENT, FINAL_STATES, LOG, PROGRESS, QUEUED, \
    READY, RESULT

LOG_LINES = 400
EOF = object()  # what a reader thread queues when its stream ends


def read_lines(stream, events: queue.Queue, parse: bool = True) -> None:
    """Reader thread: each line of ``stream`` onto ``events`` (a JSON event, or the text where ``parse`` is off
    or it is not JSON), then :data:`EOF`. The pipe worker's events and a one-shot command's output alike."""
    for line in stream:
        line = line.rstrip("\n")
        if parse:
            if not line.strip():
                continue
            try:
                line = json.loads(line)
            except ValueError:
                line = {"event": LOG, "level": "warning", "message": f"unparsed: {line.strip()[:500]}"}
        events.put(line)
    events.put(EOF)


class Job:
    """One generation as the client sees it; updated by :meth:`Worker.poll`."""

    def __init__(self, job_id: str, job_dir: Path):
        self.id = job_id
        self.job_dir = job_dir
        self.state = QUEUED
        self.stage = ""
        self.fraction = 0.0
        self.message = ""
        self.result_path: str | None = None
        self.views_path: str | None = None  # multi-view models: the generated views (PNG grid)
        self.stats: dict = {}
        self.error: dict | None = None  # {"code", "message", "hint"}
        self.cancel_requested_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def fail(self, code: str, message: str, hint: str = "") -> None:
        self.state = ERROR
        self.error = {"code": code, "message": message, "hint": hint}

    def cleanup(self) -> None:
        """Delete the job folder (the result file included): call once the result is imported."""
        shutil.rmtree(self.job_dir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.state} {self.stage} {self.fraction:.2f} {self.error or ''}>"


class Transport:
    """What both transports share: the job in flight, the queue of events its reader threads fill, the log."""

    def __init__(self, temp_dir: str | None):
        self.temp_dir = temp_dir
        self.job: Job | None = None
        self.ready_info: dict | None = None
        self.log: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self._events: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)

    @property
    def busy(self) -> bool:
        return self.job is not None and not self.job.finished

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(list(self.log)[-lines:])

    def _new_job(self) -> Job:
        if self.temp_dir:
            os.makedirs(self.temp_dir, exist_ok=True)
        job_dir = Path(tempfile.mkdtemp(prefix="job-", dir=self.temp_dir))
        job = Job(f"job-{os.getpid()}-{next(self._ids)}", job_dir)
        self.job = job
        return job

    def _apply(self, event: dict) -> None:
        kind = event.get("event")
        if kind == READY:
            self.ready_info = event
            return
        if kind == LOG:
            self.log.append(f"[worker] {event.get('message', '')}")
            return
        job = self.job
        if job is None or job.finished or event.get("id") not in (job.id, None):
            return
        if kind == PROGRESS:
            job.stage = event.get("stage", job.stage)
            job.fraction = float(event.get("fraction", 0.0))
            job.message = event.get("message", "")
        elif kind == RESULT:
            job.result_path = event.get("path")
            job.views_path = event.get("views")
            job.stats = event.get("stats") or {}
            job.state = DONE
            job.fraction = 1.0
        elif kind == ERROR_EVENT:
            if event.get("code") == CANCELLED_CODE:
                job.state = CANCELLED
            else:
                job.fail(event.get("code", "internal"), event.get("message", "unknown error"), event.get("hint", ""))
            job.cleanup()

    def wait(self, timeout: float | None = None, interval: float = 0.02) -> Job:
        """Block until the job in flight is finished (scripts, tests and Blender's background mode)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.poll()
            if self.job is None or self.job.finished:
                return self.job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job did not finish in {timeout} s: {self.job!r}")
            time.sleep(interval)

    def poll(self) -> list[dict]:
        raise NotImplementedError

    def _drain(self) -> tuple[list[dict], bool]:
        """Apply every queued event to the job; never blocks. -> (the events, whether the stream ended)."""
        seen, ended = [], False
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return seen, ended
            if event is EOF:
                ended = True
                continue
            seen.append(event)
            self._apply(event)
