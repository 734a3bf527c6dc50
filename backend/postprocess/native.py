"""Long native calls (xatlas, Instant Meshes, the quadric reduction) in a child process that can be ended.

A native call holds the GIL until it returns, and one that never returns (xatlas on a degenerate mesh spun
forever) would hold the worker or the server's replica with it. Here the call runs in ``python -m
backend.postprocess.native FOLDER``: its arrays go there as an .npz (no pickle either way), the result comes
back the same way. The parent polls the child every :data:`POLL_S`: a cancel kills it at once, and so does
the deadline, which fails the job with :class:`NativeTimeout` (code ``timeout``) while the worker lives on.

The child dies with its parent: it shares the worker's process group (the client kills the group), on Linux
the kernel kills it when the parent goes (PR_SET_PDEATHSIG), and everywhere faulthandler's watchdog thread,
which needs no GIL, ends it a little after its deadline.
"""

from __future__ import annotations

import faulthandler
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import BackendError

POLL_S = 0.05  # how often the parent looks at the child and the cancel flag: a cancel lands this fast
# Every deadline starts here: a child's start (Python, numpy, the library; seconds on a loaded machine or
# under an antivirus scan) and a small mesh's work fit many times over.
BASE_S = 60.0
# The child's own watchdog ends it this long after the parent's deadline, in case the parent is gone.
ORPHAN_GRACE_S = 30.0
_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds the backend package


class NativeTimeout(BackendError):
    """A native step (UV atlas, remeshing, reduction) did not finish within its deadline."""

    code = "timeout"


class NativeFailed(RuntimeError):
    """The native step raised an error, or its process ended without a result."""


def deadline(count: int, seconds_per_item: float) -> float:
    """:data:`BASE_S` plus a time per face (or vertex) that is about ten times what was measured on a busy
    two-core machine: a slow computer never meets it, a call that never returns is ended in minutes."""
    return BASE_S + max(int(count), 0) * float(seconds_per_item)


def call(target: str, arrays: dict, params: dict, *, seconds: float, what: str, hint: str = "",
         check: Optional[Callable[[], None]] = None) -> dict:
    """``module:function`` called in a child process as ``function(**arrays, **params)``, which returns a dict
    of arrays (or numbers). ``params`` must be JSON. ``check()`` is polled and may raise (a cancel): the child
    is killed first. Past ``seconds`` the child is killed and :class:`NativeTimeout` raised."""
    with tempfile.TemporaryDirectory(prefix="image_to_3d-native-") as folder:
        folder = Path(folder)
        np.savez(folder / "in.npz", **arrays)
        (folder / "call.json").write_text(json.dumps({"target": target, "params": params, "parent": os.getpid(),
                                                      "watchdog": seconds + ORPHAN_GRACE_S}), encoding="utf-8")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")])))
        # stdout goes nowhere: Instant Meshes prints its progress there, and the CLI's fd 1 is its --json channel.
        process = subprocess.Popen([sys.executable, "-m", "backend.postprocess.native", str(folder)], env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            limit = time.monotonic() + seconds
            while True:
                try:
                    status = process.wait(POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if check is not None:
                    check()
                if time.monotonic() > limit:
                    raise NativeTimeout(f"{what} did not finish within {seconds:,.0f} s", hint=hint)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if status == 0:
            with np.load(folder / "out.npz") as data:
                return {name: data[name] for name in data.files}
        error = folder / "error.json"
        if error.is_file():
            raised = json.loads(error.read_text(encoding="utf-8"))
            if raised["type"] == "MemoryError":
                raise MemoryError(f"{what}: {raised['message']}")
            raise NativeFailed(f"{what} failed: {raised['type']}: {raised['message']}")
        raise NativeFailed(f"{what} ended without a result (exit status {status})")


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it went before the line above
        os._exit(1)


def main(folder: str) -> int:
    """The child: read the call, run it, write ``out.npz`` (or ``error.json``)."""
    from ..files import atomic_output

    folder = Path(folder)
    request = json.loads((folder / "call.json").read_text(encoding="utf-8"))
    _die_with_parent(int(request["parent"]))
    faulthandler.dump_traceback_later(float(request["watchdog"]), exit=True)
    try:
        module, name = request["target"].split(":")
        function = getattr(importlib.import_module(module), name)
        with np.load(folder / "in.npz") as data:
            arrays = {key: data[key] for key in data.files}
        result = function(**arrays, **request["params"])
        with atomic_output(folder / "out.npz") as f:
            np.savez(f, **result)
    except Exception as e:  # noqa: BLE001 - the parent raises it again, by name and message
        (folder / "error.json").write_text(json.dumps({"type": type(e).__name__, "message": str(e)}),
                                           encoding="utf-8")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
