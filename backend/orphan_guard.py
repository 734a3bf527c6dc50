"""End the worker once its client is gone, even from inside a native call that holds the GIL.

The worker's reader thread sees stdin's end, cancels the job and, past a grace, ends the process
(``worker.read_requests``). A job inside a native call that never returns to Python holds the GIL throughout
(xatlas on a hostile mesh: measured, no other thread ran for 43 s), so neither the job nor the reader can act,
and the worker would spin on after Blender is gone. So on POSIX a small watcher process, started with the worker,
waits for the hang-up of the same stdin pipe (``poll`` without reading: the requests stay the worker's) and kills
the worker if it is still there ``grace`` seconds later. The worker stops its watcher when it ends normally;
killed, it leaves the watcher to notice within 0.2 s (it checks its parent) and end too. The watcher has a
session of its own so that a stray signal to the worker's group cannot take it first, and so that the client,
which kills and then checks that group, finds it empty at once (a grandchild is reaped by init, later).
Windows has no ``poll`` on pipes: there the reader's own grace is the guard.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys

# Run with -I -S: the standard library only, no site-packages (starts in ~30 ms, ~9 MB RSS).
_WATCHER = r"""
import os, select, signal, sys, time
worker, grace = int(sys.argv[1]), float(sys.argv[2])
poller = select.poll()
poller.register(0, 0)  # no events asked for: a hang-up wakes it, a request waiting to be read does not
while os.getppid() == worker:
    events = poller.poll(200)
    if events:
        if not events[0][1] & select.POLLHUP:
            sys.exit(0)  # not a pipe poll can watch (POLLNVAL...): leave it to the worker's own reader
        break
else:
    sys.exit(0)  # the worker ended first
deadline = time.monotonic() + grace
while os.getppid() == worker and time.monotonic() < deadline:
    time.sleep(0.1)
if os.getppid() == worker:
    print(f"worker {worker}: its client is gone and the job did not stop within {grace:g} s (stuck in a "
          "native call); killing it", file=sys.stderr, flush=True)
    os.kill(worker, signal.SIGKILL)
"""


def start(grace: float) -> subprocess.Popen | None:
    """Watch this process's stdin from a child process (POSIX; None elsewhere). Call it once fd 1 no longer
    carries the protocol: the watcher inherits fds 0 and 2 only (fd 1 goes to /dev/null)."""
    if os.name != "posix" or not hasattr(select, "poll"):
        return None
    return subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHER, str(os.getpid()), str(grace)],
                            stdin=None, stdout=subprocess.DEVNULL, close_fds=True, start_new_session=True)


def stop(watcher: subprocess.Popen | None) -> None:
    """End the watcher of a worker that is ending normally (nothing is left to watch)."""
    if watcher is not None and watcher.poll() is None:
        watcher.kill()
        watcher.wait()
