"""Writing a file whole or not at all: the one way the backend (engine, client and server) puts a file in place.

Each file is written under a unique temporary name beside its target (``tempfile.mkstemp``: O_EXCL, so a link
planted there is never followed) and renamed into place only when the block succeeds; on any failure,
Ctrl+C or SIGTERM (see :func:`sigterm_as_interrupt`) the temporaries are removed. Overwriting keeps the old
file's permissions. Standard library only: Blender's side imports it too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import tempfile
import threading
from pathlib import Path


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp makes private (0600) files; a new output gets the mode a plain open() would give it.
NEW_FILE_MODE = 0o666 & ~_current_umask()


def _final_mode(path: Path) -> int:
    """The permissions of the file being replaced (a 0600 output stays private), else a new file's."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return NEW_FILE_MODE


@contextlib.contextmanager
def atomic_outputs(paths, mode: str = "wb", permissions: int | None = None):
    """Yield one file object per path, each a temporary file beside its target. Only when the block
    succeeds are they renamed into place, in the order given (put the main file last, so that whoever
    sees it finds its companions); on any failure no file is left under a final name. ``permissions``
    forces the final mode (e.g. 0o600 for a secret); by default an overwritten file keeps its own."""
    paths = [Path(p) for p in paths]
    temporaries, placed = [], []
    try:
        with contextlib.ExitStack() as stack:
            files = []
            for path in paths:
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
                temporaries.append(tmp)
                files.append(stack.enter_context(os.fdopen(fd, mode)))
            yield files
        for tmp, path in zip(temporaries, paths):
            os.chmod(tmp, _final_mode(path) if permissions is None else permissions)
            os.replace(tmp, path)
            placed.append(path)
    except BaseException:
        for leftover in [*temporaries, *placed]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        raise


@contextlib.contextmanager
def atomic_output(path, mode: str = "wb", permissions: int | None = None):
    """Yield a file object for a temporary file that becomes ``path`` only on success."""
    with atomic_outputs([path], mode, permissions) as (f,):
        yield f


def write_bytes(path, data: bytes, permissions: int | None = None) -> Path:
    """``path.write_bytes(data)``, whole or not at all."""
    with atomic_output(path, "wb", permissions) as f:
        f.write(data)
    return Path(path)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a service manager, ``kill``, a parent ending us) raises KeyboardInterrupt in the main thread, so
    that it unwinds like Ctrl+C: temporaries are removed and the usual 'interrupted' exit is taken. Only the main
    thread can own signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
