"""One-shot backend commands of the preferences (check, install, download), standard library only.

A :class:`Task` runs ``python -m backend <command> --json`` in its own process group. Reader threads
queue its stdout lines (JSON events: ``progress``, ``result``, ``error``) and keep its stderr as a log;
:meth:`Task.poll` (called from a Blender timer on the main thread) only drains that queue, so it never
blocks. :meth:`Task.cancel` kills the process group. :meth:`Task.wait` blocks (background mode, tests).
"""

from __future__ import annotations

import collections
import json
import os
import queue
import signal
import subprocess
import threading
import time

from ..protocol import CANCELLED, DONE, ERROR, ERROR_EVENT, PROGRESS, RESULT, RUNNING
from .jobs import EOF, read_lines


class Task:
    """One backend command. ``document=True``: stdout is one JSON document (``check``), not JSON lines."""

    def __init__(self, kind: str, args: list, *, cwd: str, env: dict, timeout: float | None = None,
                 document: bool = False, key: str = "", expected_total: int | None = None):
        self.kind, self.key = kind, key
        self.expected_total = expected_total  # bytes, where the process cannot say (a file of unknown size)
        self.args = [str(a) for a in args]
        self.cwd, self.env, self.timeout, self.document = cwd, env, timeout, document
        self.state = RUNNING
        self.fraction = 0.0
        self.message = ""
        self.bytes_done = 0
        self.bytes_total: int | None = None
        self.rate = 0.0
        self.result: dict | None = None
        self.error: dict | None = None  # {"code", "message", "hint"}
        self.returncode: int | None = None
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        self.started = time.monotonic()
        self._stdout: list[str] = []
        self._events: queue.Queue = queue.Queue()  # stdout's lines
        self._log_lines: queue.Queue = queue.Queue()  # stderr's
        self._open_streams = 2
        self._cancelled = False
        # Seconds a cancelled process gets to end on SIGTERM (its Ctrl+C: a download removes its temporary file)
        # before it is killed; 0: killed at once.
        self.grace = 0.0
        kwargs = {"start_new_session": True} if os.name == "posix" else {
            "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        try:
            self.process = subprocess.Popen(self.args, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                            encoding="utf-8", errors="replace", **kwargs)
        except OSError as exc:
            self.process = None
            self._finish_failed("start", f"Could not start {self.args[0]}: {exc.strerror or exc}",
                                "Check the Python path in the add-on preferences")
            return
        for stream, lines in ((self.process.stdout, self._events), (self.process.stderr, self._log_lines)):
            threading.Thread(target=read_lines, args=(stream, lines, False), daemon=True,
                             name=f"image_to_3d-{kind}").start()

    @property
    def finished(self) -> bool:
        return self.state != RUNNING

    @property
    def pid(self):
        return self.process.pid if self.process else None

    def poll(self) -> "Task":
        """Apply what arrived since the last call; never blocks."""
        if self.finished:
            return self
        for is_log, lines in ((False, self._events), (True, self._log_lines)):
            while True:
                try:
                    line = lines.get_nowait()
                except queue.Empty:
                    break
                if line is EOF:
                    self._open_streams -= 1
                elif is_log:
                    self.log.append(line)
                elif self.document:
                    self._stdout.append(line)
                else:
                    self._apply(line)
        if self.timeout is not None and time.monotonic() - self.started > self.timeout and self.process.poll() is None:
            self._kill()
            self._finish_failed("timeout", f"{' '.join(self.args[1:4])} did not answer within {self.timeout:.0f} s",
                                "The backend Python may be stuck importing torch; try Check again")
            return self
        if self._open_streams <= 0 and self.process.poll() is not None:
            self._finish()
        return self

    def _apply(self, line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            self.log.append(line)
            return
        if not isinstance(event, dict):
            return
        kind = event.get("event")
        if kind == PROGRESS:
            if "fraction" in event:
                self.fraction = float(event["fraction"])
            if "message" in event:
                self.message = str(event["message"])
            if "bytes" in event:
                self.bytes_done = int(event["bytes"])
                self.bytes_total = event.get("total")
                self.rate = float(event.get("rate") or 0.0)
                total = self.bytes_total or self.expected_total
                if total:
                    self.fraction = min(1.0, self.bytes_done / total)
        elif kind == RESULT:
            self.result = event
        elif kind == ERROR_EVENT:
            self.error = {"code": event.get("code", "internal"), "message": event.get("message", ""),
                          "hint": event.get("hint", "")}
        elif "ok" in event and event.get("ok") is False and isinstance(event.get("error"), dict):
            self.error = self.error or dict(event["error"])

    def _finish(self) -> None:
        self.returncode = self.process.wait()
        if self._cancelled:
            self.state = CANCELLED
            return
        if self.document:
            try:
                self.result = json.loads("\n".join(self._stdout))
            except ValueError:
                self.result = None
            if isinstance(self.result, dict):
                self.state = DONE
                return
            last = next((line for line in reversed(self.log) if line.strip()), "")
            self._finish_failed("no_answer", f"{self.args[0]} did not answer (exit status {self.returncode})",
                                last[-300:])
            return
        if self.returncode == 0 and self.error is None:
            self.state = DONE
            return
        if self.error is None:
            last = next((line for line in reversed(self.log) if line.strip()), "")
            how = f"was killed (signal {-self.returncode})" if self.returncode < 0 else \
                f"exited with status {self.returncode}"
            self.error = {"code": "exited", "message": f"The {self.kind} process {how}", "hint": last[-300:]}
        self.state = ERROR

    def _finish_failed(self, code: str, message: str, hint: str = "") -> None:
        self.error = {"code": code, "message": message, "hint": hint}
        self.state = ERROR

    def _kill(self, grace: float = 0.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if grace and os.name == "posix":
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(grace)
                return
            except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
                pass
        try:
            if os.name == "posix":
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.kill()
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def cancel(self) -> None:
        """Stop it now (its whole process group); the task ends as cancelled."""
        if self.finished:
            return
        self._cancelled = True
        self._kill(self.grace)
        self.state = CANCELLED
        self.returncode = self.process.returncode if self.process else None

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> "Task":
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll().finished:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.kind} did not finish in {timeout} s")
            time.sleep(interval)
        return self

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(list(self.log)[-lines:])

    def __repr__(self) -> str:
        return f"<Task {self.kind} {self.key} {self.state} {self.fraction:.2f} {self.error or ''}>"
