"""What a client of the shared server may ask, checked before its job is queued (no Ray here).

``POST /generate`` takes one JSON object::

    {"op": "generate" | "bake", "options": {...}, "image": "<base64>", "image_name": "chair.png",
     "mesh": "<base64 .npz>"}          # bake only: the polygon mesh, as the worker's bake request names a file

The options are the worker's (:class:`~.pipeline.Options`), checked as the CLI checks them, less what the server
keeps for itself: its model files, its devices, and any path on its disks. The image is read as the CLI reads it,
once per request (the Generator gets it decoded), so a bad one gets the CLI's message, naming the file as the client
named it. Every refusal is a :class:`Refusal`: an HTTP status and the worker's error fields (code, message, hint).
"""

from __future__ import annotations

import base64
import binascii
import json
import re

from ..errors import BackendError, InputError
from ..options import check as check_all, parse as parse_options
from ..protocol import JOB_OPS
from . import token as serve_token

OPS = JOB_OPS
# Options a client may not set: the server's own files and devices (and a licence only its operator accepts).
SERVER_OPTIONS = ("weights", "u2net_path", "device", "views", "save_views", "accept_licence")
SAFE_NAME = re.compile(r"[^\w.\- ]+")


class Refusal(Exception):
    """A request refused before anything runs: ``status`` and the worker's error fields."""

    def __init__(self, status: int, code: str, message: str, hint: str = ""):
        super().__init__(message)
        self.status, self.code, self.message, self.hint = status, code, message, hint

    @classmethod
    def of(cls, error: BackendError, status: int = 400) -> "Refusal":
        return cls(status, error.code, error.message, error.hint)

    def body(self) -> dict:
        return {"event": "error", "code": self.code, "message": self.message, "hint": self.hint}


def unauthorized(token_digest: bytes, header: str | None) -> Refusal | None:
    """The 401 for a request whose ``Authorization`` header does not carry the token; None where it does."""
    if serve_token.accepts(token_digest, header):
        return None
    what = "The server refused the token" if serve_token.presented(header) else \
        "This server needs a token (Authorization: Bearer TOKEN)"
    return Refusal(401, "unauthorized", what)


def too_large(size: int, limit: int) -> Refusal:
    return Refusal(413, "too_large", f"The upload is {size / 2**20:.1f} MB; this server takes at most "
                   f"{limit / 2**20:.0f} MB", "Use a smaller image (1-2 megapixels are plenty), or ask the server's "
                   "operator to raise --max-upload-mb")


def parse(body: bytes, served: tuple) -> dict:
    """The job the Generator replicas run: ``op``, ``options`` (checked), ``image`` (decoded once, here: a PIL image,
    :func:`read_image`) and ``image_name``, ``mesh`` bytes. ``served``: the model ids this server offers."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: JSON nested beyond the parser
        raise Refusal(400, "bad_request", "The request is not JSON") from None
    if not isinstance(request, dict):
        raise Refusal(400, "bad_request", "The request must be a JSON object")
    op = request.get("op", "generate")
    if op not in OPS:
        raise Refusal(400, "bad_request", f"unknown op {op!r}; use one of {', '.join(OPS)}")
    options = request.get("options") or {}
    check_options(options, served)
    job = {"op": op, "options": options, "image": None, "image_name": None, "mesh": None}
    if request.get("image") is not None:
        job["image_name"] = upload_name(request.get("image_name"))
        job["image"] = read_image(_decoded(request["image"], "image"), job["image_name"])
    elif op == "generate" and not options.get("field_id"):
        raise Refusal(400, "bad_input", "no image given")
    if op == "bake":
        if request.get("mesh") is None:
            raise Refusal(400, "bad_input", "Bake from Model needs the mesh to bake on (mesh: a base64 .npz)")
        job["mesh"] = _decoded(request["mesh"], "mesh")
    return job


def check_options(options, served: tuple) -> None:
    """The CLI's checks (the same messages), the served models, and nothing the server keeps for itself."""
    from ..models import registry

    if not isinstance(options, dict):
        raise Refusal(400, "bad_input", "options must be a JSON object")
    kept = [k for k in SERVER_OPTIONS if options.get(k) not in (None, False) and not
            (k == "device" and options[k] == "auto")]
    if kept:
        raise Refusal(400, "bad_input", f"{', '.join(kept)}: the server chooses {'these' if len(kept) > 1 else 'this'} "
                      "itself (its own model files and devices; no client names a path on it)",
                      "Leave these options out when you send a job to a server")
    try:
        parsed = parse_options(options)
        spec = registry.get(parsed.model)
        if spec.id not in served:
            raise InputError(f"this server does not offer {spec.display_name} ({spec.id}); it offers: "
                             f"{', '.join(served)}", hint="Choose one of those models, or ask the server's operator "
                             "(cluster-serve --models)")
        check_all(parsed, spec)
    except BackendError as e:
        raise Refusal.of(e) from None


def upload_name(name) -> str:
    """The file name the client gave, without any folder, for messages (never a path on the server)."""
    name = str(name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = SAFE_NAME.sub("_", name).strip(" .")[:120]
    return name or "image"


def read_image(data: bytes, name: str):
    """The image, read (bounded) as the CLI reads it, once per request: the Generator gets this decoded image, not
    the upload. A refusal carries the CLI's message, naming the upload ``name``."""
    from .. import preprocess

    try:
        return preprocess.load_image_bytes(data, name)
    except InputError as e:
        raise Refusal(400, e.code, e.message, e.hint) from None


def _decoded(text, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise Refusal(400, "bad_request", f"the {what} is not base64") from None
