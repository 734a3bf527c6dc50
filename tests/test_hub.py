"""Model downloads against a stand-in hub on 127.0.0.1 (HF_ENDPOINT): progress, resume, verification,
offline mode and the free-space check. Never the real hub."""

import hashlib
import os
import shutil
import socket
import sys
import threading
import time
from collections import namedtuple

import pytest
from hubserver import StandInHub, Zeros
from support import TINY

from backend import hub
from backend.errors import Cancelled, WeightsError

CKPT = (TINY / "model.ckpt").read_bytes()
REV = "0123456789abcdef0123456789abcdef01234567"
PATH = f"/tiny/TripoSR/resolve/{REV}/model.ckpt"


def record(**kw):
    fields = dict(repo="tiny/TripoSR", revision=REV, path="model.ckpt", size=len(CKPT),
                  sha256=hashlib.sha256(CKPT).hexdigest())
    fields.update(kw)
    return hub.RemoteFile(**fields)


@pytest.fixture
def server(monkeypatch):
    with StandInHub({PATH: CKPT}) as s:
        monkeypatch.setenv("HF_ENDPOINT", s.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("IMAGE_TO_3D_OFFLINE", raising=False)
        yield s


def test_download_reports_progress_and_verifies(server, tmp_path):
    events = []
    dest = hub.download(record(), tmp_path / "m" / "model.ckpt", progress=lambda *e: events.append(e))
    assert dest.read_bytes() == CKPT
    assert events[-1][0] == len(CKPT) and events[-1][1] == len(CKPT) and events[-1][2] > 0
    assert all(a[0] <= b[0] for a, b in zip(events, events[1:]))  # bytes only grow
    # no partial left; beside the file, the record that it was hashed (see Checksums)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["checksums.verified.json", "model.ckpt"]
    # present and verified: no second request
    hub.download(record(), dest)
    assert len(server.requests) == 1


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    server.break_after[PATH] = 500_000
    dest = hub.download(record(), tmp_path / "model.ckpt")
    assert dest.read_bytes() == CKPT
    assert server.requests[0][:2] == (PATH, None)
    assert server.requests[1][:2] == (PATH, "bytes=500000-")


def test_cancelled_download_keeps_the_part_and_resumes_later(server, tmp_path):
    dest = tmp_path / "model.ckpt"
    partial = tmp_path / "model.ckpt.partial"
    server.piece, server.delay = 100_000, 0.05  # slow enough to cancel mid-way

    with pytest.raises(Cancelled):
        hub.download(record(), dest, cancelled=lambda: partial.exists() and partial.stat().st_size > 0)
    kept = partial.stat().st_size
    assert not dest.exists() and 0 < kept < len(CKPT)
    server.delay = 0.0
    hub.download(record(), dest)
    assert dest.read_bytes() == CKPT and not partial.exists()
    assert server.requests[-1][:2] == (PATH, f"bytes={kept}-")


def test_tampered_file_is_rejected_and_removed(server, tmp_path):
    tampered = bytearray(CKPT)
    tampered[1000] ^= 0xFF
    server.files[PATH] = bytes(tampered)
    with pytest.raises(WeightsError, match="failed its checksum: removed, never loaded"):
        hub.download(record(), tmp_path / "model.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_wrong_size_is_rejected_and_removed(server, tmp_path):
    server.files[PATH] = CKPT[:-5]
    with pytest.raises(WeightsError, match=f"instead of {len(CKPT)}: removed"):
        hub.download(record(), tmp_path / "model.ckpt")
    server.files[PATH] = CKPT + b"extra"  # refused from its declared length, before the body
    with pytest.raises(hub.DownloadError, match=f"offers {len(CKPT) + 5:,} bytes .* the {len(CKPT):,} expected"):
        hub.download(record(), tmp_path / "model.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_unknown_checksum_is_recorded_then_enforced(server, tmp_path):
    unknown = record(size=None, sha256=None)
    checksums = hub.Checksums(tmp_path / "checksums.json")
    hub.download(unknown, tmp_path / "a" / "model.ckpt", checksums=checksums)
    assert hub.Checksums(tmp_path / "checksums.json").expected(unknown) == hashlib.sha256(CKPT).hexdigest()
    server.files[PATH] = CKPT[:-1] + bytes([CKPT[-1] ^ 0xFF])
    with pytest.raises(WeightsError, match="checksum"):
        hub.download(unknown, tmp_path / "b" / "model.ckpt", checksums=hub.Checksums(tmp_path / "checksums.json"))
    assert not (tmp_path / "b" / "model.ckpt").exists()


def test_md5_is_checked_where_the_publisher_gives_one(server, tmp_path):
    with pytest.raises(WeightsError, match="checksum"):
        hub.download(record(sha256=None, md5="0" * 32), tmp_path / "model.ckpt")
    good = hub.download(record(sha256=None, md5=hashlib.md5(CKPT).hexdigest()), tmp_path / "model.ckpt")
    assert good.read_bytes() == CKPT


Connect = namedtuple("Connect", "event args")


def test_offline_opens_no_socket(server, tmp_path, monkeypatch):
    seen = []

    def audit(event, args):
        if event in ("socket.connect", "socket.getaddrinfo") and watching:
            seen.append(Connect(event, args))

    watching = False
    sys.addaudithook(audit)  # cannot be removed: it only records while `watching`
    watching = True
    try:
        with pytest.raises(hub.OfflineError) as e:
            hub.download(record(), tmp_path / "model.ckpt", online=False)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(hub.OfflineError):
            hub.download(record(), tmp_path / "model.ckpt")
    finally:
        watching = False
    assert seen == [] and server.requests == []
    # the message names the file, its size and the folder to put it in
    assert "model.ckpt" in e.value.message and hub.human_size(len(CKPT)) in e.value.message
    assert str(tmp_path) in e.value.hint
    # the audit hook does see connections when they happen
    watching = True
    try:
        socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))).close()
    finally:
        watching = False
    assert seen


def test_full_disk_is_reported_before_any_byte(server, tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(hub.DownloadError, match="not enough free space"):
        hub.download(record(), tmp_path / "model.ckpt")
    assert server.requests == [] and list(tmp_path.iterdir()) == []


def test_http_errors_are_explained(server, tmp_path):
    server.status[PATH] = 401
    with pytest.raises(hub.DownloadError, match="refused") as e:
        hub.download(record(), tmp_path / "model.ckpt")
    assert "token" in e.value.hint
    with pytest.raises(hub.DownloadError, match="not found"):
        hub.download(record(path="nope.ckpt"), tmp_path / "nope.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_token_is_sent_as_bearer(server, tmp_path):
    hub.download(record(), tmp_path / "model.ckpt", token="hf_secret")
    assert server.requests[-1][2] == "Bearer hf_secret"


def run_download(*args, env):
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-m", "backend", "download", *map(str, args)], capture_output=True,
                          text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root), **env}, timeout=120)


def test_cli_download_rejects_files_that_are_not_the_official_ones(tmp_path):
    """The stand-in hub serves the tiny model where the official TripoSR should be: sizes/checksums differ,
    so nothing is kept."""
    from backend.models import registry

    spec = registry.get("triposr")
    served = {f"/{f.repo}/resolve/{f.revision}/{f.path}": (TINY / f.path).read_bytes() for f in spec.files}
    with StandInHub(served) as s:
        r = run_download("--model", "triposr", "--store", tmp_path, "--json", env={"HF_ENDPOINT": s.url})
    assert r.returncode == 3, r.stderr
    assert "config.yaml has 924 bytes instead of 987: removed" in r.stderr
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert s.requests[0][0] == f"/stabilityai/TripoSR/resolve/{registry.TRIPOSR_REVISION}/config.yaml"


def test_cli_download_offline_names_files_sizes_and_folder(tmp_path):
    with StandInHub({}) as s:
        r = run_download("--model", "triposr", "--store", tmp_path, "--offline", env={"HF_ENDPOINT": s.url})
    assert r.returncode == 3 and s.requests == []
    assert "config.yaml (987 B) is not on this machine and online access is off" in r.stderr
    assert str(tmp_path / "triposr") in r.stderr


def test_fetch_downloads_a_whole_model_with_overall_progress(tmp_path, monkeypatch):
    """Every file of a model, one byte count across files."""
    from backend.models import registry

    files = tuple(record(path=name, size=(TINY / name).stat().st_size,
                         sha256=hashlib.sha256((TINY / name).read_bytes()).hexdigest())
                  for name in ("config.yaml", "model.ckpt"))
    spec = registry.ModelSpec("tiny", "Tiny", "tiny/TripoSR", files, "MIT", 32, 25.0, None)
    monkeypatch.setitem(registry.MODELS, "tiny", spec)
    served = {f"/tiny/TripoSR/resolve/{REV}/{f.path}": (TINY / f.path).read_bytes() for f in files}
    events = []
    with StandInHub(served) as s:
        monkeypatch.setenv("HF_ENDPOINT", s.url)
        folder = registry.fetch("tiny", tmp_path, progress=lambda *e: events.append(e))
    total = sum(f.size for f in files)
    assert folder == tmp_path / "tiny" and events[-1][:2] == (total, total)
    monkeypatch.setenv("IMAGE_TO_3D_MODELS", str(tmp_path))
    assert registry.find_folder(spec) == folder  # the store is where models are looked for


# --- Hostile servers and files (issue 20, findings 2 and 7) ---


def test_the_token_stays_on_the_hub_across_redirects(server, tmp_path):
    """The hub redirects within itself (the token goes along), then to a second origin (another port): that one
    never sees the token."""
    moved = f"/tiny/TripoSR/resolve/{REV}/moved.ckpt"
    with StandInHub({"/cdn/model.ckpt": CKPT}) as other:
        server.redirect[PATH] = moved
        server.redirect[moved] = other.url + "/cdn/model.ckpt"
        dest = hub.download(record(), tmp_path / "model.ckpt", token="hf_secret")
    assert dest.read_bytes() == CKPT
    assert server.requests == [(PATH, None, "Bearer hf_secret"), (moved, None, "Bearer hf_secret")]
    assert other.requests == [("/cdn/model.ckpt", None, None)]


@pytest.mark.parametrize("target", ["http://hub.example/x",  # plain http
                                    "https://hub.example:8443/x", "https://cdn.example/x",  # other origins
                                    "https://hub.example.evil.test/x"])
def test_a_redirect_off_the_hub_or_to_plain_http_drops_the_token(monkeypatch, target):
    """No TLS stand-in here: the redirect handler itself, with an https endpoint."""
    import urllib.request

    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example")
    handler = hub._TokenStaysHome()
    request = urllib.request.Request("https://hub.example/a/resolve/r/f",
                                     headers={"Authorization": "Bearer hf_secret", "Range": "bytes=5-"})
    moved = handler.redirect_request(request, None, 302, "Found", {}, target)
    assert not moved.has_header("Authorization") and moved.get_header("Range") == "bytes=5-"
    for same in ("https://hub.example/b", "https://HUB.example:443/b"):
        kept = handler.redirect_request(request, None, 302, "Found", {}, same)
        assert kept.get_header("Authorization") == "Bearer hf_secret"


def test_a_file_with_its_own_url_never_gets_the_token(server, tmp_path):
    """As rembg's u2net on GitHub: wherever its url points, the hub's own origin included."""
    with StandInHub({"/releases/u2net.onnx": CKPT}) as other:
        for i, base in enumerate((other.url, server.url)):
            server.files["/releases/u2net.onnx"] = CKPT
            f = hub.RemoteFile("danielgatis/rembg", "v0.0.0", "u2net.onnx", url=f"{base}/releases/u2net.onnx",
                               md5=hashlib.md5(CKPT).hexdigest())
            hub.download(f, tmp_path / str(i) / "u2net.onnx", token="hf_secret")
    assert [r[2] for r in other.requests + server.requests] == [None, None]


@pytest.mark.parametrize("declared", [True, False])
def test_an_over_long_body_stops_at_the_size(server, tmp_path, declared):
    """200 MB sent for a 1,000-byte file, its length declared or not: stopped there, nothing kept."""
    server.files[PATH] = hub_zeros = Zeros(200 * 10**6)
    if not declared:
        server.no_length.add(PATH)
    with pytest.raises(hub.DownloadError, match="expected.*nothing kept"):
        hub.download(record(size=1000, sha256="0" * 64), tmp_path / "model.ckpt")
    assert server.sent.get(PATH, 0) < 32 << 20 < len(hub_zeros)  # socket buffers, not the whole body
    assert list(tmp_path.iterdir()) == []


def test_a_file_of_unknown_size_stops_at_the_cap(server, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "UNKNOWN_SIZE_CAP", 4 << 20, raising=False)
    server.files[PATH] = Zeros(200 * 10**6)
    server.no_length.add(PATH)
    with pytest.raises(hub.DownloadError, match="expected.*nothing kept"):
        hub.download(record(size=None, sha256=None), tmp_path / "m" / "model.ckpt",
                     checksums=hub.Checksums(tmp_path / "checksums.json"))
    assert server.sent.get(PATH, 0) < 36 << 20
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no partial, no checksum recorded


def tamper(path):
    """Flip a byte in place, size kept. An edit moves the mtime; the bump makes sure of it on file systems with
    coarse timestamps."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))


def test_an_unpinned_file_is_checked_against_its_recorded_hash_at_every_use(server, tmp_path):
    unknown = record(size=None, sha256=None)
    dest = hub.download(unknown, tmp_path / "m" / "model.ckpt", checksums=hub.Checksums(tmp_path / "checksums.json"))
    assert hub.Checksums(tmp_path / "checksums.json").expected(unknown) == hashlib.sha256(CKPT).hexdigest()
    tamper(dest)
    with pytest.raises(WeightsError, match="failed its checksum: removed, never loaded"):
        hub.download(unknown, dest, checksums=hub.Checksums(tmp_path / "checksums.json"))
    assert not dest.exists() and len(server.requests) == 1


def test_a_right_size_tampered_file_on_disk_is_refused(server, tmp_path):
    dest = hub.download(record(), tmp_path / "model.ckpt")
    tamper(dest)
    with pytest.raises(WeightsError, match="failed its checksum: removed, never loaded"):
        hub.download(record(), dest)
    assert not dest.exists()
    # one put there by hand, never downloaded: the same
    dest.write_bytes(bytes(len(CKPT)))
    with pytest.raises(WeightsError, match="failed its checksum"):
        hub.download(record(), dest, online=False)
    assert not dest.exists() and len(server.requests) == 1


def test_a_verified_file_is_hashed_again_only_once_it_changes(server, tmp_path, monkeypatch):
    hashed = []
    digests = hub._digests
    monkeypatch.setattr(hub, "_digests", lambda path: hashed.append(path) or digests(path))
    dest = hub.download(record(), tmp_path / "model.ckpt")
    assert len(hashed) == 1
    for _ in range(3):  # another process, another Checksums: the record beside the store is shared
        hub.download(record(), dest, checksums=hub.Checksums(tmp_path / "checksums.json"), online=False)
    assert len(hashed) == 1
    stat = dest.stat()
    os.utime(dest, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: hashed again, still right
    hub.download(record(), dest, online=False)
    hub.download(record(), dest, online=False)
    assert len(hashed) == 2 and dest.read_bytes() == CKPT


def test_cancel_lands_within_a_second_on_a_stalled_connection(server, tmp_path):
    server.stall_after[PATH] = 200_000
    asked = threading.Event()
    threading.Timer(0.5, asked.set).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        hub.download(record(), tmp_path / "model.ckpt", cancelled=asked.is_set, timeout=5)
    assert time.monotonic() - started < 1.5
    assert (tmp_path / "model.ckpt.partial").stat().st_size == 200_000  # kept to resume
    deadline = time.monotonic() + 2
    while any(t.name == "hub-download" for t in threading.enumerate()):  # the reading thread ends too
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_stalled_connection_still_times_out_then_resumes(server, tmp_path):
    server.stall_after[PATH] = 200_000
    started = time.monotonic()
    dest = hub.download(record(), tmp_path / "model.ckpt", timeout=0.5)
    assert dest.read_bytes() == CKPT and time.monotonic() - started >= 0.5
    assert [r[1] for r in server.requests] == [None, "bytes=200000-"]
