"""The shared server's token: where it comes from, and checking a request's ``Authorization: Bearer`` header.

In this order: ``--token-file FILE``, ``$IMAGE_TO_3D_SERVER_TOKEN``, else the server's own file in the per-user
config folder (beside the licence acceptances), made on the first start with a new random token: that is the
only time the token is shown. The server keeps only the token's SHA-256; requests are checked against it with
:func:`hmac.compare_digest`. Standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from .. import files, licences
from ..errors import InputError
from ..protocol import TOKEN_ENV as ENV

FILE_NAME = "server-token"
MIN_LENGTH = 16  # a shorter token can be guessed; ours are 43 characters (32 random bytes)


def default_file() -> Path:
    return licences.config_dir() / FILE_NAME


def resolve(token_file: str | None = None, environ=os.environ) -> tuple[str, str, bool]:
    """(token, where it is from, whether it was made now)."""
    if token_file:
        return _checked(_read(Path(token_file).expanduser()), token_file), str(token_file), False
    if environ.get(ENV):
        return _checked(environ[ENV].strip(), f"${ENV}"), f"${ENV}", False
    path = default_file()
    if path.is_file():
        return _checked(_read(path), str(path)), str(path), False
    return _create(path), str(path), True


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise InputError(f"cannot read the token file {path}: {e.strerror or e}") from None


def _checked(token: str, origin: str) -> str:
    if len(token) < MIN_LENGTH or any(c.isspace() for c in token):
        raise InputError(f"the token from {origin} is unusable: it needs at least {MIN_LENGTH} characters and "
                         "no spaces",
                         hint="Make one with: python -c \"import secrets; print(secrets.token_urlsafe(32))\"")
    return token


def loose_permissions(path: str | Path) -> bool:
    """A token file others on this machine can read (POSIX only)."""
    try:
        return os.name == "posix" and bool(Path(path).stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False


def _create(path: Path) -> str:
    """A new token in ``path``, readable by this user only from the moment it exists (0600, never widened)."""
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_bytes(path, (token + "\n").encode("utf-8"), permissions=0o600)  # mkstemp: 0600 from the start
    return token


def digest(token: str) -> bytes:
    """What the server keeps instead of the token."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def presented(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, or None."""
    scheme, _, value = (header or "").strip().partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


def accepts(expected_digest: bytes, header: str | None) -> bool:
    token = presented(header)
    # Compared as digests: the same length whatever was sent, in constant time.
    return token is not None and hmac.compare_digest(digest(token), expected_digest)
