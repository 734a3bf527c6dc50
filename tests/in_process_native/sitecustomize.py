"""On the PYTHONPATH of a worker under test: its native calls (xatlas, Instant Meshes, the reduction) run in the
worker itself, holding its GIL, as they did before backend/postprocess/native.py ran them in a child process.
That is the worker backend/orphan_guard.py's watcher is for: a call that no thread of the worker can interrupt."""

import importlib
import sys

if sys.orig_argv[-2:] == ["backend", "serve"]:  # the worker only
    from backend.postprocess import native

    def call(target, arrays, params, **_):
        module, name = target.split(":")
        return getattr(importlib.import_module(module), name)(**arrays, **params)

    native.call = call
