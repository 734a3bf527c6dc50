"""Shared test helpers (plain module: the tests folder is on sys.path under pytest's default import mode)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
TINY = DATA / "triposr_tiny"
OPENLRM_TINY = DATA / "openlrm_tiny"


def run_backend(command, *args, env=None):
    """``python -m backend COMMAND ARGS`` in a fresh process, as a user runs it."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "backend", command, *map(str, args)], capture_output=True,
                          text=True, env=full_env, cwd=ROOT, timeout=300)


def weld_points(v, tol=1e-6):
    return np.unique(np.round(np.asarray(v, np.float64) / tol), axis=0) * tol


def assert_same_mesh(vertices, faces, ref_vertices, ref_faces):
    """Order-independent comparison, as the fixture README asks: welded point sets within 1e-5, face counts
    within 0.5 %."""
    from scipy.spatial import cKDTree  # here: the device check's machine runs tests without scipy

    a, b = weld_points(vertices), weld_points(ref_vertices)
    gap = max(cKDTree(b).query(a)[0].max(), cKDTree(a).query(b)[0].max())
    assert gap <= 1e-5, f"vertex sets differ by {gap}"
    assert abs(len(faces) - len(ref_faces)) <= 0.005 * len(ref_faces)


LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def listening(processes) -> set:
    """(pid, local address) of every socket the processes listen on (TCP) or receive on (UDP)."""
    import socket

    import psutil

    found = set()
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")
        except (psutil.Error, OSError):
            continue
        found.update((process.pid, c.laddr) for c in connections
                     if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr))
    return found


def beyond_loopback(sockets) -> list:
    """The sockets of :func:`listening` that other machines could reach."""
    return sorted((pid, addr) for pid, addr in sockets if addr.ip not in LOOPBACK)
