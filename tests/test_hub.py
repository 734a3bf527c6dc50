"""Model downloads through huggingface_hub against a stand-in hub on 127.0.0.1 (HF_ENDPOINT, tests/hubserver.py)
with a second origin as its CDN: the pinned revision, resume after a cut, our size and sha256 pins on top (a wrong
file removed from the cache), an over-long body stopped, cancel, offline, gated repositories, the token kept on the
hub, and a model already in a Hugging Face cache used in place. Never the real hub."""

import dataclasses
import hashlib
import os
import shutil
import socket
import sys
from collections import namedtuple
from pathlib import Path

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
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return folder


@pytest.fixture
def server(monkeypatch, cache):
    with StandInHub({PATH: CKPT}) as s:
        monkeypatch.setenv("HF_ENDPOINT", s.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("IMAGE_TO_3D_OFFLINE", raising=False)
        yield s


def checksums(tmp_path):
    return hub.Checksums(tmp_path / "store" / "checksums.json")


def kept_files(cache: Path) -> list:
    """What the cache holds of files: blobs, snapshot entries and temporaries (not the library's locks)."""
    return sorted(p.name for p in cache.rglob("*") if (p.is_file() or p.is_symlink()) and ".locks" not in p.parts
                  and p.name != "CACHEDIR.TAG")


def test_a_pinned_download_lands_in_the_cache_at_its_revision(server, cache, tmp_path):
    events = []
    path = hub.download(record(), checksums=checksums(tmp_path), progress=lambda *e: events.append(e))
    assert path == cache / "models--tiny--TripoSR" / "snapshots" / REV / "model.ckpt" and path.read_bytes() == CKPT
    assert path.is_symlink() and Path(os.path.realpath(path)).parent.name == "blobs"  # the library's layout
    assert events[-1][:2] == (len(CKPT), len(CKPT)) and events[-1][2] > 0
    assert all(a[0] <= b[0] for a, b in zip(events, events[1:]))  # bytes only grow
    assert [h[0] for h in server.heads] == [PATH] and [r[0] for r in server.requests] == [PATH]
    # in the cache at the pinned revision, verified: used where it is, no request at all (no HEAD either)
    assert hub.download(record(), checksums=checksums(tmp_path)) == path
    assert len(server.heads) == 1 and len(server.requests) == 1


def test_a_cut_download_resumes_with_a_range_request(server, tmp_path):
    data = bytes(range(256)) * (96 * 4096)  # 24 MiB: the library keeps what it wrote in 10 MiB pieces
    server.files[PATH] = data
    server.break_after[PATH] = 15 << 20
    path = hub.download(record(size=len(data), sha256=hashlib.sha256(data).hexdigest()),
                        checksums=checksums(tmp_path))
    assert path.read_bytes() == data
    assert [r[1] for r in server.requests] == [None, f"bytes={10 << 20}-"]
    assert server.sent[PATH] == len(data) + (5 << 20)  # only the part not kept was sent again


def test_cancel_stops_the_download_and_keeps_nothing(server, cache, tmp_path):
    server.files[PATH] = Zeros(64 << 20)
    server.piece, server.delay = 1 << 20, 0.01
    seen = []
    with pytest.raises(Cancelled, match="cancelled"):
        hub.download(record(size=64 << 20, sha256="0" * 64), checksums=checksums(tmp_path),
                     progress=lambda *e: seen.append(e), cancelled=lambda: bool(seen))
    assert server.sent[PATH] < 48 << 20 and kept_files(cache) == []  # not the whole file


def test_a_tampered_file_is_rejected_and_removed_from_the_cache(server, cache, tmp_path):
    tampered = bytearray(CKPT)
    tampered[1000] ^= 0xFF
    server.files[PATH] = bytes(tampered)
    with pytest.raises(WeightsError, match="failed its checksum: removed, never loaded"):
        hub.download(record(), checksums=checksums(tmp_path))
    assert kept_files(cache) == []  # neither the snapshot's entry nor the blob
    # the right file then downloads afresh (the library does not believe a blob it no longer has)
    server.files[PATH] = CKPT
    assert hub.download(record(), checksums=checksums(tmp_path)).read_bytes() == CKPT


def tamper(path):
    """Flip a byte in place, size kept. An edit moves the mtime; the bump makes sure of it on file systems with
    coarse timestamps."""
    path = Path(os.path.realpath(path))
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))


def test_a_file_tampered_in_the_cache_is_refused_and_removed(server, cache, tmp_path):
    path = hub.download(record(), checksums=checksums(tmp_path))
    tamper(path)
    with pytest.raises(WeightsError, match="failed its checksum: removed, never loaded"):
        hub.download(record(), checksums=checksums(tmp_path), online=False)
    assert kept_files(cache) == [] and len(server.requests) == 1


def test_a_wrong_size_is_rejected_and_removed(server, cache, tmp_path):
    server.files[PATH] = CKPT[:-5]
    with pytest.raises(WeightsError, match=f"instead of {len(CKPT)}: removed"):
        hub.download(record(), checksums=checksums(tmp_path))
    assert kept_files(cache) == []


@pytest.mark.parametrize("declared", [True, False])
def test_an_over_long_body_is_stopped_at_the_size(server, cache, tmp_path, declared):
    """200 MB sent for a 1,000-byte file, its length declared or not: stopped there, nothing kept."""
    server.files[PATH] = Zeros(200 * 10**6)
    if not declared:
        server.no_length.add(PATH)
    with pytest.raises(hub.DownloadError, match="expected.*nothing kept"):
        hub.download(record(size=1000, sha256="0" * 64), checksums=checksums(tmp_path))
    assert server.sent.get(PATH, 0) < 32 << 20  # socket buffers and one of the library's pieces, not the body
    assert kept_files(cache) == []


def test_a_file_of_unknown_size_stops_at_the_cap(server, cache, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "UNKNOWN_SIZE_CAP", 4 << 20)
    server.files[PATH] = Zeros(200 * 10**6)
    server.no_length.add(PATH)
    with pytest.raises(hub.DownloadError, match="expected.*nothing kept"):
        hub.download(record(size=None, sha256=None), checksums=checksums(tmp_path))
    assert server.sent.get(PATH, 0) < 36 << 20
    assert kept_files(cache) == [] and not (tmp_path / "store" / "checksums.json").exists()


def test_an_unpinned_file_has_its_hash_recorded_then_enforced(server, cache, tmp_path):
    unknown = record(size=None, sha256=None)
    path = hub.download(unknown, checksums=checksums(tmp_path))
    assert checksums(tmp_path).expected(unknown) == hashlib.sha256(CKPT).hexdigest()
    tamper(path)
    with pytest.raises(WeightsError, match="failed its checksum"):
        hub.download(unknown, checksums=checksums(tmp_path))
    assert kept_files(cache) == []


def test_a_verified_file_is_hashed_again_only_once_it_changes(server, tmp_path, monkeypatch):
    hashed = []
    digests = hub._digests
    monkeypatch.setattr(hub, "_digests", lambda path: hashed.append(path) or digests(path))
    path = hub.download(record(), checksums=checksums(tmp_path))
    for _ in range(3):  # another process, another Checksums: the record beside the store is shared
        hub.download(record(), checksums=checksums(tmp_path), online=False)
    assert len(hashed) == 1
    blob = Path(os.path.realpath(path))
    stat = blob.stat()
    os.utime(blob, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: hashed again, still right
    hub.download(record(), checksums=checksums(tmp_path), online=False)
    hub.download(record(), checksums=checksums(tmp_path), online=False)
    assert len(hashed) == 2


Connect = namedtuple("Connect", "event args")


def test_offline_refuses_at_once_and_opens_no_socket(server, cache, tmp_path, monkeypatch):
    seen = []

    def audit(event, args):
        if event in ("socket.connect", "socket.getaddrinfo") and watching:
            seen.append(Connect(event, args))

    watching = False
    sys.addaudithook(audit)  # cannot be removed: it only records while `watching`
    watching = True
    try:
        with pytest.raises(hub.OfflineError) as e:
            hub.download(record(), checksums=checksums(tmp_path), online=False)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(hub.OfflineError):
            hub.download(record(), checksums=checksums(tmp_path))
    finally:
        watching = False
    assert seen == [] and server.requests == server.heads == []
    # the message names the file, its size, where it comes from and the folder to put it in
    assert "model.ckpt" in e.value.message and hub.human_size(len(CKPT)) in e.value.message
    assert REV in e.value.hint and str(cache) in e.value.hint
    watching = True  # the audit hook does see connections when they happen
    try:
        socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))).close()
    finally:
        watching = False
    assert seen


def test_full_disk_is_reported_before_any_request(server, cache, tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(hub.DownloadError, match="not enough free space"):
        hub.download(record(), checksums=checksums(tmp_path))
    assert server.requests == server.heads == []


@pytest.mark.parametrize("status", [401, 403])
def test_a_gated_repo_says_to_accept_the_terms_then_set_a_token(server, tmp_path, status):
    server.status[PATH] = status
    server.error_code[PATH] = "GatedRepo"
    with pytest.raises(hub.DownloadError, match=f"access to tiny/TripoSR was refused \\(HTTP {status}\\)") as e:
        hub.download(record(), checksums=checksums(tmp_path))
    assert "accept the terms on the model's page (https://huggingface.co/tiny/TripoSR), then set a token" in e.value.hint
    server.error_code.pop(PATH)  # a refusal without the hub's code says the same
    with pytest.raises(hub.DownloadError, match="refused") as e:
        hub.download(record(), checksums=checksums(tmp_path))
    assert "then set a token" in e.value.hint


def test_a_missing_file_is_named(server, tmp_path):
    with pytest.raises(hub.DownloadError, match=f"nope.ckpt was not found in tiny/TripoSR at revision {REV}"):
        hub.download(record(path="nope.ckpt"), checksums=checksums(tmp_path))


def test_the_token_goes_to_the_hub_and_never_to_its_cdn(server, tmp_path, monkeypatch):
    """The hub answers with the file's metadata and a redirect to a second origin (another port), as it does for
    files on its CDN: the hub sees the token, the CDN never does. The token comes from HF_TOKEN here, as Blender
    gives it; the library asks for nothing else (no API call, no telemetry)."""
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    with StandInHub({"/cdn/blob": CKPT}) as cdn:
        server.redirect[PATH] = cdn.url + "/cdn/blob"
        path = hub.download(record(), checksums=checksums(tmp_path))
    assert path.read_bytes() == CKPT
    assert server.heads == [(PATH, "Bearer hf_secret")] and server.requests == []
    assert cdn.requests == [("/cdn/blob", None, None)] and cdn.heads == []


def test_a_file_with_its_own_url_never_gets_the_token_and_resumes_its_part(server, tmp_path, monkeypatch):
    """As rembg's u2net on GitHub: a plain download, wherever its url points (the hub's own origin included);
    a part cut off is kept beside it and the next try goes on from there."""
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    md5 = hashlib.md5(CKPT).hexdigest()
    with StandInHub({"/releases/u2net.onnx": CKPT}) as other:
        for i, base in enumerate((other.url, server.url)):
            server.files["/releases/u2net.onnx"] = CKPT
            f = hub.RemoteFile("danielgatis/rembg", "v0.0.0", "u2net.onnx", url=f"{base}/releases/u2net.onnx", md5=md5)
            dest = hub.download(f, tmp_path / str(i) / "u2net.onnx", token="hf_secret")
            assert dest.read_bytes() == CKPT and not dest.with_name("u2net.onnx.partial").exists()
        assert [r[2] for r in other.requests + server.requests] == [None, None]
        partial = tmp_path / "2" / "u2net.onnx.partial"
        partial.parent.mkdir()
        partial.write_bytes(CKPT[:1000])  # what a cancelled try left
        f = hub.RemoteFile("danielgatis/rembg", "v0.0.0", "u2net.onnx", url=f"{other.url}/releases/u2net.onnx",
                           md5=md5)
        assert hub.download(f, tmp_path / "2" / "u2net.onnx").read_bytes() == CKPT
        assert other.requests[-1][:2] == ("/releases/u2net.onnx", "bytes=1000-")
        with pytest.raises(WeightsError, match="checksum"):  # the md5 the publisher gives is checked
            hub.download(dataclasses.replace(f, md5="0" * 32), tmp_path / "3" / "u2net.onnx")
    assert not (tmp_path / "3" / "u2net.onnx").exists() and not (tmp_path / "3" / "u2net.onnx.partial").exists()


def run_download(*args, env):
    import subprocess

    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-m", "backend", "download", *map(str, args)], capture_output=True,
                          text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root), **env}, timeout=120)


def test_cli_download_rejects_files_that_are_not_the_official_ones(tmp_path):
    """The stand-in hub serves the tiny model where the official TripoSR should be: sizes differ, so nothing is
    kept, in the store or the cache."""
    from backend.models import registry

    spec = registry.get("triposr")
    served = {f"/{f.repo}/resolve/{f.revision}/{f.path}": (TINY / f.path).read_bytes() for f in spec.files}
    with StandInHub(served) as s:
        r = run_download("--model", "triposr", "--store", tmp_path / "store", "--json",
                         env={"HF_ENDPOINT": s.url, "HF_HUB_CACHE": str(tmp_path / "hf")})
    assert r.returncode == 3, r.stderr
    assert "config.yaml has 924 bytes instead of 987: removed" in r.stderr
    assert kept_files(tmp_path) == []
    assert s.heads[0][0] == f"/stabilityai/TripoSR/resolve/{registry.TRIPOSR_REVISION}/config.yaml"


def test_cli_download_offline_names_files_sizes_and_folder(tmp_path):
    with StandInHub({}) as s:
        r = run_download("--model", "triposr", "--store", tmp_path, "--offline",
                         env={"HF_ENDPOINT": s.url, "HF_HUB_CACHE": str(tmp_path / "hf")})
    assert r.returncode == 3 and s.requests == s.heads == []
    assert "config.yaml (987 B) is not on this machine and online access is off" in r.stderr
    assert f"into {tmp_path / 'triposr'}" in r.stderr  # the model's folder in the store


def tiny_spec(monkeypatch, repo="tiny/TripoSR"):
    from backend.models import registry

    files = tuple(record(repo=repo, path=name, size=(TINY / name).stat().st_size,
                         sha256=hashlib.sha256((TINY / name).read_bytes()).hexdigest())
                  for name in ("config.yaml", "model.ckpt"))
    spec = registry.ModelSpec("tiny", "Tiny", repo, files, "MIT", 32, 25.0, None)
    monkeypatch.setitem(registry.MODELS, "tiny", spec)
    return spec


def test_fetch_downloads_a_whole_model_with_overall_progress(server, cache, tmp_path, monkeypatch):
    """Every file of a model, one byte count across files; the store's folder holds links into the cache."""
    from backend.models import registry

    spec = tiny_spec(monkeypatch)
    server.files.update({f"/tiny/TripoSR/resolve/{REV}/{f.path}": (TINY / f.path).read_bytes() for f in spec.files})
    events = []
    store = tmp_path / "store"
    folder = registry.fetch("tiny", store, progress=lambda *e: events.append(e))
    total = sum(f.size for f in spec.files)
    assert folder == store / "tiny" and events[-1][:2] == (total, total)
    for f in spec.files:
        assert (folder / f.path).is_symlink() and (folder / f.path).samefile(hub.cached(f))
    monkeypatch.setenv("IMAGE_TO_3D_MODELS", str(store))
    assert registry.find_folder(spec) == folder
    assert registry.missing_files(spec, store) == []


def test_a_model_already_in_a_hugging_face_cache_is_used_in_place(server, cache, tmp_path, monkeypatch):
    """A cache another tool made (the library itself, here): found with no network and no copy, by the worker's
    lookup and by Download alike."""
    import huggingface_hub

    from backend.models import registry

    spec = tiny_spec(monkeypatch)
    for f in spec.files:
        server.files[f"/tiny/TripoSR/resolve/{REV}/{f.path}"] = (TINY / f.path).read_bytes()
        huggingface_hub.hf_hub_download(f.repo, f.path, revision=REV, cache_dir=cache, endpoint=server.url)
    snapshot = cache / "models--tiny--TripoSR" / "snapshots" / REV
    heads, gets = len(server.heads), len(server.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    store = tmp_path / "store"
    monkeypatch.setenv("IMAGE_TO_3D_MODELS", str(store))
    assert registry.find_folder(spec) == snapshot  # where it is
    assert registry.missing_files(spec, store) == []
    folder = registry.fetch("tiny", store)  # verified there, linked, nothing fetched
    assert (len(server.heads), len(server.requests)) == (heads, gets)
    copies = [p for p in store.rglob("*") if p.is_file() and not p.is_symlink() and p.suffix != ".json"]
    assert copies == [] and all((folder / f.path).samefile(snapshot / f.path) for f in spec.files)


def test_a_model_from_two_repos_is_one_folder_of_links(server, cache, tmp_path, monkeypatch):
    """As InstantMesh (Zero123++ and InstantMesh): the loader wants one folder; the store's is made of links to
    the two repos' snapshots."""
    from backend.models import registry

    spec = tiny_spec(monkeypatch)
    other = record(repo="tiny/Other", path="unet/config.json", size=2, sha256=hashlib.sha256(b"{}").hexdigest())
    spec = registry.ModelSpec("tiny", "Tiny", spec.repo, (*spec.files, other), "MIT", 32, 25.0, None)
    monkeypatch.setitem(registry.MODELS, "tiny", spec)
    server.files.update({f"/tiny/TripoSR/resolve/{REV}/{f.path}": (TINY / f.path).read_bytes() for f in spec.files[:2]})
    server.files[f"/tiny/Other/resolve/{REV}/unet/config.json"] = b"{}"
    store = tmp_path / "store"
    registry.fetch("tiny", store)
    shutil.rmtree(store)  # the links gone: the worker's lookup makes them again from the cache, offline
    monkeypatch.setenv("IMAGE_TO_3D_MODELS", str(store))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = registry.find_folder(spec)
    assert folder == store / "tiny" and (folder / "unet" / "config.json").read_bytes() == b"{}"
    assert (folder / "model.ckpt").samefile(hub.cached(spec.files[1]))


def test_files_of_an_earlier_version_in_the_store_are_still_found(server, cache, tmp_path, monkeypatch):
    """Before downloads went to the cache, they went to <store>/<id>/: those files are used (hashed first)."""
    from backend.models import registry

    spec = tiny_spec(monkeypatch)
    store = tmp_path / "store"
    for f in spec.files:
        (store / "tiny").mkdir(parents=True, exist_ok=True)
        shutil.copy(TINY / f.path, store / "tiny" / f.path)
    monkeypatch.setenv("IMAGE_TO_3D_MODELS", str(store))
    assert registry.find_folder(spec) == store / "tiny"
    assert registry.fetch("tiny", store, online=False) == store / "tiny"
    assert server.requests == server.heads == [] and kept_files(cache) == []
