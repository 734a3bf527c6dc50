"""The one backend of this Blender session and the job in flight (no bpy here): the local worker, or a shared
server (the Remote backend), both with the client interface the operators use (``submit``, ``poll``, ``cancel``).

The local worker is started on the first Generate 3D and kept warm (its model cache) until Free Memory,
a change of backend Python, a cancel, a switch to Remote, or disabling the add-on.
"""

from __future__ import annotations

import os
from pathlib import Path

from .jobs import Job
from .pipe import EXTENSION_ROOT, Worker, default_env
from .remote import RemoteWorker

_worker: Worker | RemoteWorker | None = None


def backend_for(remote: tuple | None, python: str, temp_dir: str, env: dict | None = None) -> Worker | RemoteWorker:
    """The session's backend: the shared server ``remote`` = (url, token) when the Remote backend is chosen,
    else the local worker of ``python``."""
    if remote is not None:
        return remote_for(*remote, temp_dir)
    return worker_for(python, temp_dir, env)


def worker_for(python: str, temp_dir: str, env: dict | None = None) -> Worker:
    """The session's worker for this interpreter and environment (a new one if either changed, e.g. the
    model store, the token, or Allow Online Access)."""
    python = os.path.abspath(python)
    env = env if env is not None else default_env(EXTENSION_ROOT)
    return _replace_unless(lambda w: isinstance(w, Worker) and (w.python, w.temp_dir, w.env) == (python, temp_dir, env),
                           lambda: Worker(python, EXTENSION_ROOT, env=env, temp_dir=temp_dir))


def remote_for(url: str, token: str, temp_dir: str) -> RemoteWorker:
    """The session's client of the server at ``url`` (ValueError for a URL that is not one). Switching to it
    stops the local worker, which frees the memory it held."""
    url = url.strip().rstrip("/")
    return _replace_unless(lambda w: isinstance(w, RemoteWorker) and (w.url, w.token, w.temp_dir) == (url, token,
                                                                                                      temp_dir),
                           lambda: RemoteWorker(url, token, temp_dir=temp_dir))


def _replace_unless(fits, make):
    global _worker
    if _worker is not None and not fits(_worker):
        if _worker.busy:
            raise RuntimeError("a generation is already running")
        _worker.stop()
        _worker = None
    if _worker is None:
        _worker = make()
    return _worker


def current() -> Worker | RemoteWorker | None:
    return _worker


def current_job() -> Job | None:
    return _worker.job if _worker is not None else None


def is_busy() -> bool:
    return _worker is not None and _worker.busy


def worker_running() -> bool:
    """A local worker process is up (a Remote backend holds nothing on this machine)."""
    return isinstance(_worker, Worker) and _worker.running


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
