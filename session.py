"""The one backend worker of this Blender session and the job in flight (no bpy here).

The worker is started on the first Generate 3D and kept warm (its model cache) until Free Memory,
a change of backend Python, a cancel, or disabling the add-on.
"""

from __future__ import annotations

import os
from pathlib import Path

from .backend.client import EXTENSION_ROOT, Job, Worker, default_env

_worker: Worker | None = None


def worker_for(python: str, temp_dir: str, env: dict | None = None) -> Worker:
    """The session's worker for this interpreter and environment (a new one if either changed, e.g. the
    model store, the token, or Allow Online Access)."""
    global _worker
    python = os.path.abspath(python)
    env = env if env is not None else default_env(EXTENSION_ROOT)
    if _worker is not None and (_worker.python != python or _worker.temp_dir != temp_dir or _worker.env != env):
        if _worker.busy:
            raise RuntimeError("a generation is already running")
        _worker.stop()
        _worker = None
    if _worker is None:
        _worker = Worker(python, EXTENSION_ROOT, env=env, temp_dir=temp_dir)
    return _worker


def current() -> Worker | None:
    return _worker


def current_job() -> Job | None:
    return _worker.job if _worker is not None else None


def is_busy() -> bool:
    return _worker is not None and _worker.busy


def worker_running() -> bool:
    return _worker is not None and _worker.running


def stop() -> None:
    """Stop the worker (frees all memory it holds); a job in flight ends as cancelled."""
    global _worker
    if _worker is not None:
        _worker.stop()
        _worker = None


def default_backend_python() -> str:
    """<extension root>/.venv/bin/python (what ``make venv`` creates) if present, else ''."""
    for candidate in (Path(EXTENSION_ROOT, ".venv", "bin", "python"),
                      Path(EXTENSION_ROOT, ".venv", "Scripts", "python.exe")):
        if candidate.is_file():
            return str(candidate)
    return ""
