"""The backend environment and the model store as Blender sees them: folders, process environments, and
the background tasks of the preferences (check, install, downloads) followed by one timer.

Tasks are :class:`core.tasks.Task` subprocesses; their results are applied here, on the main thread, by
the timer (or directly in background mode, where timers never fire). bpy is never touched from a thread.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import bpy

from .backend.client import EXTENSION_ROOT, catalog, default_env
from .backend.client.commands import Task

TICK_S = 0.1  # how often a timer follows a job or a task (the operators' jobs use it too)
CHECK_TIMEOUT_S = 180.0  # the first `import torch` of a fresh environment can take a while

TASKS: dict = {}  # key ("check", "install", "download:<model>") -> Task
DONE_CALLBACKS: dict = {}  # key -> fn(task) run on the main thread when the task ends
CHECKS: dict = {}  # python path -> {"level", "line", "todo", "report"}
OUTCOMES: dict = {}  # key -> {"level": "INFO"|"ERROR", "message", "hint"} of the last finished task


def user_dir(name: str) -> Path:
    """A writable folder of the extension (kept across updates): ``models``, ``backend-env``."""
    return Path(bpy.utils.extension_path_user(__package__, path=name, create=True))


def model_store() -> Path:
    return user_dir("models")


def backend_env_dir() -> Path:
    return user_dir("backend-env")


def online() -> bool:
    return bool(bpy.app.online_access)


def offline_reason() -> str:
    if getattr(bpy.app, "online_access_overriden", False):
        return "Online access is off (Blender was started offline): downloads are disabled"
    return "Allow Online Access is off (Preferences › System › Network): downloads are disabled"


def process_env(prefs, token: bool = False) -> dict:
    """Environment of every backend process: the worker's base plus the model store and offline mode (no
    connection at all while Allow Online Access is off); with ``token`` (downloads only), the Hugging Face token,
    never on a command line."""
    env = default_env(EXTENSION_ROOT)  # an HF_TOKEN Blender was started with stays, unless the preference has one
    env.update(catalog.store_env(model_store(), online=online(),
                                 token=(prefs.hf_token if prefs and token else "") or ""))
    return env


# -- tasks ------------------------------------------------------------------------------------------

def running(key: str) -> Task | None:
    task = TASKS.get(key)
    return task if task is not None and not task.finished else None


def start(key: str, task: Task, on_done=None, block: bool = False) -> Task:
    TASKS[key] = task
    OUTCOMES.pop(key, None)
    if on_done is not None:
        DONE_CALLBACKS[key] = on_done
    if block:
        task.wait()
        finish(key)
    elif not bpy.app.timers.is_registered(tick):
        bpy.app.timers.register(tick, first_interval=TICK_S, persistent=True)
    return task


def finish(key: str) -> None:
    task = TASKS.pop(key, None)
    callback = DONE_CALLBACKS.pop(key, None)
    if task is not None and callback is not None:
        callback(task)


def tick():
    """Poll every task; apply the finished ones. Returns the next delay, or None when nothing runs."""
    for key, task in list(TASKS.items()):
        if task.poll().finished:
            finish(key)
    redraw()
    return TICK_S if TASKS else None


def cancel(key: str) -> bool:
    task = running(key)
    if task is None:
        return False
    task.cancel()
    return True


def stop_all() -> None:
    for key in list(TASKS):
        TASKS[key].cancel()
        TASKS.pop(key, None)
        DONE_CALLBACKS.pop(key, None)
    if bpy.app.timers.is_registered(tick):
        bpy.app.timers.unregister(tick)


def redraw() -> None:
    wm = bpy.context.window_manager
    for window in getattr(wm, "windows", ()):
        for area in window.screen.areas:
            if area.type in ("PREFERENCES", "VIEW_3D"):
                area.tag_redraw()


def backend_command(python: str, *args) -> list:
    return [python, "-m", "backend", *map(str, args)]


def new_task(kind: str, python: str, args: list, prefs, *, key: str = "", timeout=None, document=False,
             expected_total=None, token: bool = False) -> Task:
    return Task(kind, backend_command(python, *args), cwd=str(EXTENSION_ROOT), env=process_env(prefs, token),
                timeout=timeout, document=document, key=key, expected_total=expected_total)


def blender_python() -> str:
    """Blender's own Python (Install Backend needs nothing else)."""
    return sys.executable


def record_check(python: str, task: Task) -> dict:
    report = task.result if task.state == "done" else None
    error = (task.error or {}).get("message", "") if report is None else ""
    if report is None and task.error and task.error.get("hint"):
        error += f" ({task.error['hint']})"
    level, line, todo = catalog.check_summary(report, error)
    CHECKS[os.path.abspath(python)] = {"level": level, "line": line, "todo": todo, "report": report}
    return CHECKS[os.path.abspath(python)]


def check_of(python: str) -> dict | None:
    return CHECKS.get(os.path.abspath(python)) if python else None
