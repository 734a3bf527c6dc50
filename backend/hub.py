"""Downloading model files: pinned revisions, resume, size + sha256 verification, offline mode.

Standard library only: Blender's own Python runs it too (the preferences' Download buttons), before
any backend environment exists. Files arrive as ``<name>.partial`` beside their destination and are
renamed into place only once their size and sha256 are right; a file that fails is deleted, and a
body longer than the file is cut off there. A file already in place is hashed too before it is trusted
(once per change: see `Checksums`). The Hugging Face token goes only to the hub's own origin
(``HF_ENDPOINT``), never across a redirect elsewhere nor to a file with its own URL. Offline (Blender's
*Allow Online Access* off, ``--offline``, ``HF_HUB_OFFLINE=1``), no connection is attempted at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import queue
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import BackendError, Cancelled, WeightsError

DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 20
RETRIES = 3
SPACE_MARGIN = 64 << 20  # keep some room: a disk filled to the last byte breaks other programs
# A file with no published size stops here. The largest file of any model is 1.8 GB and those without a size
# are at most 1.3 GB (registry.APPROX_BYTES); a server that streams without end must not fill the disk.
UNKNOWN_SIZE_CAP = 4 << 30
POLL = 0.1  # seconds between looks at `cancelled` while the network is silent
QUEUED_CHUNKS = 8  # read ahead of the disk at most this many chunks


@dataclass(frozen=True)
class RemoteFile:
    """One file of a model: where it comes from and what it must be."""

    repo: str
    revision: str
    path: str
    size: Optional[int] = None
    sha256: Optional[str] = None
    url: Optional[str] = None  # for files outside the Hugging Face hub
    md5: Optional[str] = None  # where the publisher gives only an md5 (rembg's u2net)

    @property
    def name(self) -> str:
        return Path(self.path).name


# What --offline sets: this process and every library in it (the hub client, transformers) never connect.
OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "IMAGE_TO_3D_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class OfflineError(WeightsError):
    code = "offline"


class DownloadError(BackendError):
    code = "download"


def online_allowed(online: Optional[bool] = None) -> bool:
    if online is not None:
        return online
    return os.environ.get("HF_HUB_OFFLINE", "0") in ("", "0") and os.environ.get("IMAGE_TO_3D_OFFLINE", "0") in ("", "0")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def file_url(f: RemoteFile) -> str:
    if f.url:
        return f.url
    return f"{endpoint()}/{f.repo}/resolve/{f.revision}/{f.path}"


def _origin(url: str) -> Optional[tuple]:
    """(scheme, host, port), the default port filled in; None for a URL without a usable one."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    port = port or {"http": 80, "https": 443}.get(scheme)
    return (scheme, parts.hostname, port) if parts.hostname and port else None


class _TokenStaysHome(urllib.request.HTTPRedirectHandler):
    """urllib copies every header onto the request a redirect makes, Authorization included, wherever it leads:
    the hub sends large files on to a CDN, and a hostile or compromised server could send them to plain http
    or to itself. The token goes on only to the endpoint's own origin (same scheme, host and port)."""

    def __init__(self):
        self.home = _origin(endpoint())

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and (self.home is None or _origin(newurl) != self.home):
            new.remove_header("Authorization")
        return new


def human_size(n: Optional[int]) -> str:
    if n is None:
        return "size unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict) -> None:
    """Whole or not at all, under a name of its own (two processes may write at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Checksums:
    """sha256 of files whose checksum no public source gives: recorded on first download (or the first time a
    file put in place by hand is seen), then enforced at every later `download` of it: the Download buttons,
    ``backend download`` and `registry.fetch` all go through `download`, which hashes a file already in place
    before returning it. Stored as JSON in the model store (``checksums.json``).

    Beside it, ``checksums.verified.json`` remembers the files found right, by path, (size, mtime_ns) and their
    digests, so that a 1.7 GB file is hashed once, not at every use, and again as soon as it changes. It is a
    cache, not a pin: lose it and files are hashed again."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.known = _read_json(self.path)
        self.verified_path = self.path.with_suffix(".verified.json")
        self.verified = _read_json(self.verified_path)

    @staticmethod
    def key(f: RemoteFile) -> str:
        return f.url or f"{f.repo}@{f.revision}/{f.path}"

    def expected(self, f: RemoteFile) -> Optional[str]:
        return f.sha256 or self.known.get(self.key(f))

    def record(self, f: RemoteFile, sha256: str) -> None:
        if f.sha256 or self.key(f) in self.known:
            return
        self.known = {**_read_json(self.path), **self.known}  # what another process recorded meanwhile
        self.known.setdefault(self.key(f), sha256)
        _write_json(self.path, self.known)

    def _stamp(self, path: Path) -> list:
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]

    def is_verified(self, f: RemoteFile, path: Path) -> bool:
        """``path`` was hashed unchanged since and matched what ``f`` must be now."""
        entry = self.verified.get(str(Path(path).resolve()))
        if not isinstance(entry, dict) or entry.get("stamp") != self._stamp(path):
            return False
        expected = self.expected(f)
        return bool(expected) and entry.get("sha256") == expected and (not f.md5 or entry.get("md5") == f.md5)

    def mark_verified(self, path: Path, sha256: str, md5: str, stamp: Optional[list] = None) -> None:
        """``stamp``: the file's, taken before it was hashed (a change while hashing then shows)."""
        key = str(Path(path).resolve())
        self.verified = {**_read_json(self.verified_path), **self.verified}
        self.verified[key] = {"stamp": stamp or self._stamp(path), "sha256": sha256, "md5": md5}
        with contextlib.suppress(OSError):  # a read-only store: files are hashed at every use, nothing worse
            _write_json(self.verified_path, self.verified)


ProgressFn = Callable[[int, Optional[int], float], None]  # bytes done, total, bytes per second


def download(f: RemoteFile, dest: Path, *, checksums: Optional[Checksums] = None, token: Optional[str] = None,
             online: Optional[bool] = None, progress: Optional[ProgressFn] = None,
             cancelled: Optional[Callable[[], bool]] = None, timeout: float = 30.0) -> Path:
    """Fetch ``f`` to ``dest`` unless a verified copy is there. Resumes a ``.partial`` left by an earlier try.
    A copy already at ``dest`` is hashed (unless `Checksums` saw it unchanged since) and, if wrong, removed with
    a `WeightsError`. ``timeout``: seconds a connection may stay silent before the try is given up (and
    resumed); ``cancelled`` is looked at every `POLL` seconds meanwhile."""
    dest = Path(dest)
    checksums = checksums or Checksums(dest.parent / "checksums.json")
    if dest.is_file() and (f.size is None or dest.stat().st_size == f.size):
        check_present(f, dest, checksums)
        return dest
    if not online_allowed(online):
        raise OfflineError(
            f"{f.name} ({human_size(f.size)}) is not on this machine and online access is off",
            hint=f"Put {f.path} from {f.repo} (revision {f.revision}) into {dest.parent}, "
                 f"or allow online access (Blender: Preferences > System > Network).")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    done = partial.stat().st_size if partial.exists() else 0
    if f.size is not None:
        if done > f.size:  # not a prefix of this file: start again
            partial.unlink()
            done = 0
        _check_space(dest.parent, f.size - done)

    for attempt in range(RETRIES + 1):
        try:
            _fetch(f, partial, token, progress, cancelled, timeout)
            break
        except _Interrupted as e:
            if attempt == RETRIES:
                raise DownloadError(f"download of {f.name} kept breaking off ({e}); {human_size(partial.stat().st_size)} "
                                    f"kept for the next try", hint="Try again later: it resumes where it stopped.") from None
            time.sleep(min(2 ** attempt, 5) * 0.1)

    sha, md5 = _verify(f, partial, checksums.expected(f))
    checksums.record(f, sha)
    os.replace(partial, dest)
    checksums.mark_verified(dest, sha, md5)
    return dest


def check_present(f: RemoteFile, path: Path, checksums: Checksums) -> None:
    """Trust a file already in place only once hashed: against its published sha256 (or md5), else the one
    recorded at its first download; a file seen for the first time without either has its sha256 recorded.
    A wrong file is removed: `WeightsError`."""
    if checksums.is_verified(f, path):
        return
    stamp = checksums._stamp(path)
    sha, md5 = _digests(path)
    expected = checksums.expected(f)
    if (expected and sha != expected) or (f.md5 and md5 != f.md5):
        path.unlink()
        raise WeightsError(f"{f.name} in {path.parent} failed its checksum: removed, never loaded",
                           hint="It was corrupted or changed on disk; download it again.")
    checksums.record(f, sha)
    checksums.mark_verified(path, sha, md5, stamp)


class _Interrupted(Exception):
    pass


def _check_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed + SPACE_MARGIN:
        raise DownloadError(f"not enough free space in {folder}: {human_size(needed)} needed, {human_size(free)} free",
                            hint="Free some space or choose another model folder in the preferences.")


class _Stream:
    """One request, its network side on a thread of its own. A read blocked on a stalled server cannot be
    interrupted on the same thread (and after a socket timeout the stream is unusable), so the caller waits on
    a queue instead and looks at ``cancelled`` every `POLL` seconds; the socket timeout stays the stall limit.
    Items: the response, then chunks (``b""`` at the end), or the exception that stopped it."""

    def __init__(self, request: urllib.request.Request, timeout: float, name: str):
        self._items = queue.Queue(maxsize=QUEUED_CHUNKS)
        self._stop = threading.Event()
        self._response = None
        self._name = name
        self._thread = threading.Thread(target=self._run, args=(request, timeout), name="hub-download", daemon=True)
        self._thread.start()

    def _run(self, request, timeout) -> None:
        try:
            response = urllib.request.build_opener(_TokenStaysHome()).open(request, timeout=timeout)
        except BaseException as e:
            self._put(e)
            return
        self._response = response
        with response:
            if not self._put(response):
                return
            while not self._stop.is_set():
                try:
                    chunk = response.read1(CHUNK)  # what has arrived: progress and cancel need no full MiB
                except BaseException as e:
                    self._put(e)
                    return
                if not self._put(chunk) or not chunk:
                    return

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._items.put(item, timeout=POLL)
                return True
            except queue.Full:
                pass
        return False

    def get(self, cancelled):
        while True:
            if cancelled and cancelled():
                raise Cancelled(f"download of {self._name} cancelled; the part already fetched is kept to resume")
            try:
                item = self._items.get(timeout=POLL)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def close(self) -> None:
        self._stop.set()
        # Wake a read blocked on a silent server. urllib gives no public way to the socket; without it the
        # thread ends at the socket timeout instead.
        sock = getattr(getattr(getattr(self._response, "fp", None), "raw", None), "_sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            self._thread.join(1.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _fetch(f: RemoteFile, partial: Path, token, progress, cancelled, timeout) -> None:
    done = partial.stat().st_size if partial.exists() else 0
    if f.size is not None and done == f.size:
        return
    request = urllib.request.Request(file_url(f), headers={"User-Agent": "image-to-3d"})
    if token and not f.url:  # the hub's token, for the hub: never to a file hosted elsewhere (u2net on GitHub)
        request.add_header("Authorization", f"Bearer {token}")
    if done:
        request.add_header("Range", f"bytes={done}-")
    with _Stream(request, timeout, f.name) as stream:
        try:
            response = stream.get(cancelled)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416 and f.size is not None and done == f.size:
                return
            if e.code in (401, 403):
                raise DownloadError(f"access to {f.repo} was refused (HTTP {e.code})",
                                    hint="The repository may be gated: accept its terms on the Hugging Face page "
                                         "and give an access token in the preferences (or HF_TOKEN).") from None
            if e.code == 404:
                raise DownloadError(f"{f.path} was not found in {f.repo} at revision {f.revision} (HTTP 404)") from None
            if e.code >= 500:
                raise _Interrupted(f"HTTP {e.code}") from None
            raise DownloadError(f"download of {f.name} failed: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise DownloadError(f"cannot reach the download server for {f.name} ({getattr(e, 'reason', e)})",
                                hint="Check the network connection (or a proxy), then try again: it resumes.") from None
        if done and response.status != 206:  # the server ignored the range: start again
            done = 0
        # Known size: not a byte more. Unknown: a declared length is enforced by http.client itself; with none,
        # the cap.
        limit = f.size if f.size is not None else UNKNOWN_SIZE_CAP
        total = _total_size(response, done)
        if total is not None and total > limit:
            _too_long(partial, f"the server offers {total:,} bytes for {f.name}, {_expected(f, limit)}")
        total = total or f.size
        if f.size is None and total is not None:
            _check_space(partial.parent, total - done)
        started, last_report = time.monotonic(), 0.0
        received = 0
        over = False
        with open(partial, "ab" if done else "wb") as out:
            while True:
                try:
                    chunk = stream.get(cancelled)
                except (OSError, ValueError, http.client.HTTPException) as e:
                    raise _Interrupted(str(e) or type(e).__name__) from None
                if not chunk:
                    break
                if done + received + len(chunk) > limit:
                    over = True
                    break
                out.write(chunk)
                received += len(chunk)
                now = time.monotonic()
                if progress and (now - last_report > 0.2):
                    progress(done + received, total, received / max(now - started, 1e-6))
                    last_report = now
        if over:
            _too_long(partial, f"the server sent more for {f.name} than {_expected(f, limit)}")
        if progress:
            progress(done + received, total, received / max(time.monotonic() - started, 1e-6))
    if total is not None and partial.stat().st_size < total:
        raise _Interrupted(f"connection closed at {partial.stat().st_size} of {total} bytes")


def _expected(f: RemoteFile, limit: int) -> str:
    return f"the {limit:,} expected" if f.size is not None else f"at most {limit:,} bytes expected"


def _too_long(partial: Path, message: str):
    with contextlib.suppress(OSError):
        partial.unlink()  # whatever it holds came from a server that sends something else
    raise DownloadError(f"{message}: stopped, nothing kept",
                        hint="The server sent something other than the model file; try again later.")


def _total_size(response, done: int) -> Optional[int]:
    content_range = response.headers.get("Content-Range")
    if content_range and "/" in content_range and response.status == 206:
        tail = content_range.rsplit("/", 1)[1]
        return int(tail) if tail.isdigit() else None
    length = response.headers.get("Content-Length")
    return (int(length) + (done if response.status == 206 else 0)) if length and length.isdigit() else None


def _verify(f: RemoteFile, partial: Path, expected_sha: Optional[str]) -> tuple[str, str]:
    """Size, then sha256; a file that fails is deleted. Returns its sha256 and md5."""
    size = partial.stat().st_size
    if f.size is not None and size != f.size:
        partial.unlink()
        raise WeightsError(f"{f.name} has {size} bytes instead of {f.size}: removed",
                           hint="The download was corrupted or the server sent another file; try again.")
    sha, md5 = _digests(partial)
    if (expected_sha and sha != expected_sha) or (f.md5 and md5 != f.md5):
        partial.unlink()
        raise WeightsError(f"{f.name} failed its checksum: removed, never loaded",
                           hint="The file was corrupted or tampered with; download it again.")
    return sha, md5


def _digests(path: Path) -> tuple[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def default_store() -> Path:
    """The model store: ``IMAGE_TO_3D_MODELS``, else the platform's per-user data folder."""
    if os.environ.get("IMAGE_TO_3D_MODELS"):
        return Path(os.environ["IMAGE_TO_3D_MODELS"]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "image_to_3d" / "models"
