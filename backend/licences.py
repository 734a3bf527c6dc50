"""Licences of model weights, and the user's acceptance of those that restrict use.

Weights whose licence forbids commercial use are only run once the user has accepted that licence
(``--accept-licence`` on the command line, ``accept_licence`` in the pipeline options). Acceptance is
per licence and remembered in ``accepted_licences.json`` under the user's config folder:
``$IMAGE_TO_3D_CONFIG_DIR``, else ``%APPDATA%/image_to_3d`` on Windows, else
``$XDG_CONFIG_HOME/image_to_3d`` (default ``~/.config/image_to_3d``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import LicenceNotAccepted

CONFIG_DIR_ENV = "IMAGE_TO_3D_CONFIG_DIR"
ACCEPTED_FILE = "accepted_licences.json"


@dataclass(frozen=True)
class Licence:
    id: str  # SPDX identifier, as in the registry
    name: str
    url: str
    terms: str  # one honest sentence; the full text is at the url
    needs_acceptance: bool


LICENCES = {lic.id: lic for lic in (
    Licence("MIT", "MIT License", "https://opensource.org/license/mit", "Permissive.", False),
    Licence("CC-BY-NC-4.0", "Creative Commons Attribution-NonCommercial 4.0 International",
            "https://creativecommons.org/licenses/by-nc/4.0/",
            "Non-commercial use only, with credit to the authors. OpenLRM's model card adds that its "
            "weights are for research purposes and cannot be used commercially; InstantMesh's view generator "
            "derives from the Zero123++ v1.2 weights, which carry this licence.", True),
)}


def get(licence_id: str) -> Licence:
    # An unlisted licence is treated as restrictive: better one question too many than none.
    return LICENCES.get(licence_id) or Licence(licence_id, licence_id, "", "See the model's own page.", True)


def config_dir() -> Path:
    if os.environ.get(CONFIG_DIR_ENV):
        return Path(os.environ[CONFIG_DIR_ENV]).expanduser()
    if sys.platform == "win32" and os.environ.get("APPDATA"):
        return Path(os.environ["APPDATA"]) / "image_to_3d"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "image_to_3d"


def acceptance_file() -> Path:
    return config_dir() / ACCEPTED_FILE


def accepted() -> dict:
    """Licence id -> record of its acceptance. An unreadable file counts as no acceptance."""
    try:
        data = json.loads(acceptance_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def notice(licence_id: str, model_name: str) -> str:
    lic = get(licence_id)
    where = f" Full text: {lic.url}" if lic.url else ""
    return f"The {model_name} weights are licensed {lic.name} ({lic.id}). {lic.terms}{where}"


def accept(licence_id: str, model_id: str) -> bool:
    """Remember that the user accepted ``licence_id``; False if it already was."""
    records = accepted()
    if licence_id in records:
        return False
    records[licence_id] = {"accepted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "first_model": model_id}
    path = acceptance_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def ensure_accepted(licence_id: str, model_id: str, model_name: str, accept_now: bool = False) -> None:
    """Raise :class:`LicenceNotAccepted` unless the licence needs no acceptance, was accepted before, or
    ``accept_now`` (which records it)."""
    if not get(licence_id).needs_acceptance or licence_id in accepted():
        return
    if accept_now:
        accept(licence_id, model_id)
        return
    raise LicenceNotAccepted(
        notice(licence_id, model_name) + " Its licence must be accepted before the model is used.",
        hint=f"Run again with --accept-licence to accept {licence_id} (once: it is remembered in {acceptance_file()}).")


def accept_or_refuse(spec, accept_now: bool) -> None:
    """A command line's --accept-licence (the CLI's, cluster-serve's): show a restrictive licence as the user accepts
    it and record it; refuse while it is not accepted."""
    if accept_now and get(spec.licence).needs_acceptance and spec.licence not in accepted():
        print(notice(spec.licence, spec.display_name), file=sys.stderr)
        accept(spec.licence, spec.id)
        print(f"Licence {spec.licence} accepted; remembered in {acceptance_file()}", file=sys.stderr)
    ensure_accepted(spec.licence, spec.id, spec.display_name)
