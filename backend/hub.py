"""Model files: our pins on top of ``huggingface_hub``, which downloads them.

The library does the transfer (pinned revision, resume of a broken connection within a download, the standard
cache and its locks, ``HF_HOME``/``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_TOKEN`` or the stored login, the token
kept off other origins across redirects). On top, what it does not do: every file is checked against our size and
sha256 pins (or the sha256 recorded at its first download: `Checksums`) before it is trusted, and a wrong one is
removed from the cache; a body longer than the file is stopped there; a download can be cancelled; offline
(Blender's *Allow Online Access* off, ``--offline``, ``HF_HUB_OFFLINE=1``) nothing connects and a missing file is
named. A file already in the cache at its pinned revision is used where it is, never copied. The one file outside
the hub (rembg's u2net) has a plain download of its own, never with the token.

This module imports the library only inside the download functions: Blender's own Python imports the rest
(sizes, the cache's layout) without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import BackendError, Cancelled, WeightsError

DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 20
SPACE_MARGIN = 64 << 20  # keep some room: a disk filled to the last byte breaks other programs
# A file with no published size stops here. The largest file of any model is 1.8 GB and those without a size
# are at most 1.3 GB (registry.APPROX_BYTES); a server that streams without end must not fill the disk.
UNKNOWN_SIZE_CAP = 4 << 30
_COMMIT = re.compile(r"[0-9a-f]{40}")


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


def hub_cache() -> Path:
    """The Hugging Face cache the library downloads into, read at each call (as the library reads it at its import):
    ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser() / "hub"


def repo_folder(repo: str, cache: Optional[Path] = None) -> Path:
    return Path(cache or hub_cache()) / f"models--{repo.replace('/', '--')}"


def snapshot_of(repo: str, revision: str, cache: Optional[Path] = None) -> Optional[Path]:
    """The cache's snapshot folder of ``repo`` at ``revision`` (a commit, or a branch the library recorded under
    ``refs/``); None when the cache has no such revision. The cache's layout, read without the library: Blender's
    own Python looks here too."""
    folder = repo_folder(repo, cache)
    commit = revision
    if not _COMMIT.fullmatch(revision):
        try:
            commit = (folder / "refs" / revision).read_text().strip()
        except OSError:
            return None
    snapshot = folder / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def cached(f: RemoteFile, cache: Optional[Path] = None) -> Optional[Path]:
    """``f`` in the cache at its pinned revision, with its published size; None if it is not there whole."""
    if f.url:
        return None
    snapshot = snapshot_of(f.repo, f.revision, cache)
    path = snapshot / f.path if snapshot else None
    if path is None or not path.is_file() or (f.size is not None and path.stat().st_size != f.size):
        return None
    return path


def download(f: RemoteFile, dest: Optional[Path] = None, *, checksums: Optional[Checksums] = None,
             token: Optional[str] = None, online: Optional[bool] = None, progress: Optional[ProgressFn] = None,
             cancelled: Optional[Callable[[], bool]] = None, cache: Optional[Path] = None) -> Path:
    """A verified local copy of ``f``; returns its path. A hub file is looked for in the Hugging Face cache at its
    pinned revision and used there, else fetched into it by ``huggingface_hub`` (resume within the download,
    the token only to the hub, redirects, the cache's layout and locks are the library's). ``dest``: for a file
    with its own URL (u2net), where it goes; for a hub file, a file already there (a folder of an earlier version)
    is used in place of the cache. Either way the file is hashed before it is trusted and removed if wrong."""
    checksums = checksums or Checksums(default_store() / "checksums.json")
    dest = Path(dest) if dest else None
    if dest is not None and dest.is_file() and (f.size is None or dest.stat().st_size == f.size):
        check_present(f, dest, checksums)
        return dest
    if not f.url:
        path = cached(f, cache)
        if path is not None:
            check_present(f, path, checksums)
            return path
    if not online_allowed(online):
        where = dest.parent if f.url or dest is not None else hub_cache()
        raise OfflineError(
            f"{f.name} ({human_size(f.size)}) is not on this machine and online access is off",
            hint=f"Put {f.path} from {f.repo} (revision {f.revision}) into {where}, "
                 f"or allow online access (Blender: Preferences > System > Network).")
    if f.url:
        if dest is None:
            raise ValueError(f"{f.name} has its own URL: give where it goes")
        return _plain_download(f, dest, checksums, progress, cancelled)
    return _hub_download(f, checksums, token, progress, cancelled, Path(cache or hub_cache()))


def check_present(f: RemoteFile, path: Path, checksums: Checksums) -> None:
    """Trust a file already in place only once hashed: against its published sha256 (or md5), else the one
    recorded at its first download; a file seen for the first time without either has its sha256 recorded.
    A wrong file is removed (in the cache: its blob too): `WeightsError`."""
    if checksums.is_verified(f, path):
        return
    stamp = checksums._stamp(path)
    sha, md5 = _digests(path)
    expected = checksums.expected(f)
    if (expected and sha != expected) or (f.md5 and md5 != f.md5):
        _remove(path)
        raise WeightsError(f"{f.name} in {path.parent} failed its checksum: removed, never loaded",
                           hint="It was corrupted or changed on disk; download it again.")
    checksums.record(f, sha)
    checksums.mark_verified(path, sha, md5, stamp)


def _remove(path: Path) -> None:
    """The file, and where it is a link (the cache's snapshot entries are), the blob it points at."""
    path = Path(path)
    target = Path(os.path.realpath(path))
    with contextlib.suppress(OSError):
        path.unlink()
    if target != path.absolute():
        with contextlib.suppress(OSError):
            target.unlink()


def _check_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed + SPACE_MARGIN:
        raise DownloadError(f"not enough free space in {folder}: {human_size(needed)} needed, {human_size(free)} free",
                            hint="Free some space or choose another model folder in the preferences.")


def _bar(f: RemoteFile, progress, cancelled):
    """A tqdm stand-in for the library's progress: it reports bytes to ``progress``, stops the download at once on
    ``cancelled`` (looked at with each chunk) and on a body longer than the file (the library would write on until
    the server stops): the exception ends the library's transfer and it removes its temporary file."""
    limit = f.size if f.size is not None else UNKNOWN_SIZE_CAP

    class Bar:
        def __init__(self, *args, total=None, initial=0, **kwargs):
            if total is not None and total > limit:
                raise _TooLong(f"the server offers {total:,} bytes for {f.name}, {_expected(f, limit)}")
            self.n = initial
            self.total = total
            self.started, self.last = time.monotonic(), 0.0
            self.first = initial

        def update(self, n=1):
            self.n += n
            if self.n > limit:
                raise _TooLong(f"the server sent more for {f.name} than {_expected(f, limit)}")
            if cancelled and cancelled():
                raise Cancelled(f"download of {f.name} cancelled")
            now = time.monotonic()
            if progress and (now - self.last > 0.2 or self.n == self.total):
                progress(self.n, self.total, (self.n - self.first) / max(now - self.started, 1e-6))
                self.last = now

        def update_transfer(self, n=1):
            pass

        def set_description(self, *a, **k):
            pass

        def close(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    return Bar


class _TooLong(Exception):
    pass


def _hub_download(f: RemoteFile, checksums: Checksums, token, progress, cancelled, cache: Path) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub import constants as hf_constants, errors as hf_errors
    except ImportError:
        raise DownloadError("huggingface_hub is not installed in this Python",
                            hint="Downloads run in the backend's environment: install the backend first "
                                 "(Install Backend, or pip install -r backend/requirements.txt).") from None
    # No request beyond the files: without this the library also fetches a registry of "agent harnesses" from
    # the endpoint and puts the torch version in its user agent. Read at each request; set here, not by the
    # environment, because transformers may have imported the library before.
    hf_constants.HF_HUB_DISABLE_TELEMETRY = True
    if f.size is not None:
        cache.mkdir(parents=True, exist_ok=True)
        _check_space(cache, f.size)
    try:
        path = Path(huggingface_hub.hf_hub_download(
            f.repo, f.path, revision=f.revision, cache_dir=cache, endpoint=endpoint(), token=token or None,
            tqdm_class=_bar(f, progress, cancelled), user_agent="image-to-3d"))
    except _TooLong as e:
        raise DownloadError(f"{e}: stopped, nothing kept",
                            hint="The server sent something other than the model file; try again later.") from None
    except hf_errors.LocalEntryNotFoundError as e:  # no answer the library could use, nothing cached
        status = _status(e.__cause__)
        if status in (401, 403):
            raise _refused(f, status) from None
        reason = str(e.__cause__ or e).splitlines()[0]
        raise DownloadError(f"cannot download {f.name} from {endpoint()} ({reason})",
                            hint="Check the network connection (or a proxy, or HF_ENDPOINT), then try again.") from None
    except hf_errors.RepositoryNotFoundError as e:  # GatedRepoError too; the hub answers 401 for a private repo
        raise _refused(f, _status(e)) from None
    except hf_errors.RevisionNotFoundError:
        raise DownloadError(f"revision {f.revision} was not found in {f.repo}") from None
    except hf_errors.RemoteEntryNotFoundError:
        raise DownloadError(f"{f.path} was not found in {f.repo} at revision {f.revision} (HTTP 404)") from None
    except hf_errors.HfHubHTTPError as e:
        if _status(e) in (401, 403):
            raise _refused(f, _status(e)) from None
        raise DownloadError(f"download of {f.name} failed: HTTP {_status(e)}", hint="Try again later.") from None
    except OSError as e:  # the library's own checks (the size it was told), the disk
        raise DownloadError(f"download of {f.name} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                            hint="Try again: a broken download starts afresh.") from None
    if f.size is not None and path.stat().st_size != f.size:
        size = path.stat().st_size
        _remove(path)
        raise WeightsError(f"{f.name} has {size} bytes instead of {f.size}: removed",
                           hint="The download was corrupted or the server sent another file; try again.")
    check_present(f, path, checksums)
    return path


def _status(error) -> Optional[int]:
    return getattr(getattr(error, "response", None), "status_code", None)


def _refused(f: RemoteFile, status) -> DownloadError:
    return DownloadError(
        f"access to {f.repo} was refused (HTTP {status})",
        hint=f"The repository is gated or private: accept the terms on the model's page "
             f"(https://huggingface.co/{f.repo}), then set a token (preferences: Hugging Face Token; or HF_TOKEN, "
             f"or `hf auth login`).")


def _plain_download(f: RemoteFile, dest: Path, checksums: Checksums, progress, cancelled) -> Path:
    """A file outside the hub (u2net on GitHub), with the library's plain HTTP transfer and never a token: into
    ``<name>.partial`` beside ``dest`` (kept on a cut or a cancel: the next try resumes there), renamed once
    verified."""
    from huggingface_hub.file_download import http_get

    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    done = partial.stat().st_size if partial.exists() else 0
    if f.size is not None:
        if done > f.size:
            partial.unlink()
            done = 0
        _check_space(dest.parent, f.size - done)
    try:
        with open(partial, "ab") as out:
            http_get(f.url, out, resume_size=done, headers={"user-agent": "image-to-3d"},
                     expected_size=f.size, tqdm_class=_bar(f, progress, cancelled))
    except _TooLong as e:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise DownloadError(f"{e}: stopped, nothing kept",
                            hint="The server sent something other than the model file; try again later.") from None
    except Cancelled:
        raise
    except Exception as e:  # noqa: BLE001 - the library's HTTP errors (httpx) and OSError
        raise DownloadError(f"download of {f.name} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                            hint="Check the network connection (or a proxy), then try again: it resumes.") from None
    sha, md5 = _verify(f, partial, checksums.expected(f))
    checksums.record(f, sha)
    os.replace(partial, dest)
    checksums.mark_verified(dest, sha, md5)
    return dest


def _expected(f: RemoteFile, limit: int) -> str:
    return f"the {limit:,} expected" if f.size is not None else f"at most {limit:,} bytes expected"


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
