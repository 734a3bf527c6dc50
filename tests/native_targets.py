"""Child-process targets for backend.postprocess.native in the tests (a plain module: the child imports it
from PYTHONPATH, as it imports the backend's own targets)."""

import os
import time

import numpy as np


def hang(pid_file: str = "", **_):
    """A native call that never returns."""
    if pid_file:
        with open(pid_file, "w") as f:
            f.write(str(os.getpid()))
    while True:
        time.sleep(1)


def echo(**arrays):
    return {name: np.asarray(value) for name, value in arrays.items()}


def fail(kind: str = "ValueError", **_):
    raise {"ValueError": ValueError, "MemoryError": MemoryError}[kind]("no good")


def die(**_):
    os._exit(3)
