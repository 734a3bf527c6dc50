"""What the panel and the preferences know about models, licences and the backend's state (no bpy here).

The model list, the per-model defaults and the files come from the backend's registry, which is
standard-library only on purpose so that Blender can import it (the torch side is never imported here).
"""

from __future__ import annotations

from pathlib import Path

from .. import hub, licences, options
from ..models import registry

U2NET = "u2net"
U2NET_SIZE = 176 * 10**6  # about; rembg publishes no size (its md5 is checked)


def specs():
    """Every model of the registry, in its order (the panel's list)."""
    return list(registry.MODELS.values())


def model_items():
    """EnumProperty items: (id, display name, description) for every model in the registry."""
    items = []
    for spec in specs():
        lic = licences.get(spec.licence)
        items.append((spec.id, spec.display_name,
                      f"{spec.repo}; weights licence {lic.id}"
                      + (" (non-commercial, accept once)" if lic.needs_acceptance else "")
                      + f"; download {size_text(spec.id)}"))
    return items


def spec(model_id: str):
    return registry.get(model_id)


def defaults(model_id: str) -> dict:
    """The model's own values, which the backend uses when an option is None."""
    s = spec(model_id)
    return {
        "resolution": s.default_resolution,
        "threshold": s.default_threshold,
        "foreground_ratio": s.default_foreground_ratio,
        "source_size": s.default_source_size or 0,
        "patch": s.patch_size,
    }


# A multi-view model's view-generation settings, as the backend defaults and bounds them.
VIEW_DEFAULTS = {"steps": options.DEFAULT_STEPS, "guidance": options.DEFAULT_GUIDANCE, "seed": options.DEFAULT_SEED}
MAX_STEPS, MAX_GUIDANCE = options.MAX_STEPS, options.MAX_GUIDANCE
SHAPE_DEFAULTS = dict(options.SHAPE_DEFAULTS)  # TripoSG's shape


def draws_views(model_id: str) -> bool:
    """A multi-view model (InstantMesh): it draws six views first (steps, guidance, seed), then meshes them
    from their fixed size (no source size)."""
    return spec(model_id).multiview


def draws_samples(model_id: str) -> bool:
    """A diffusion model, of views (InstantMesh) or of the shape itself (TripoSG): steps, guidance and seed apply,
    and no source size (its encoder's input size is fixed)."""
    s = spec(model_id)
    return s.multiview or getattr(s, "sampled", False)


def sampling_defaults(model_id: str) -> dict:
    """Steps, guidance and seed as the backend defaults them for this model."""
    return dict(SHAPE_DEFAULTS) if getattr(spec(model_id), "sampled", False) else dict(VIEW_DEFAULTS)


def uses_threshold(model_id: str) -> bool:
    """False where the model fixes its surface level (InstantMesh's mesh variants: SDF 0)."""
    return spec(model_id).default_threshold is not None


# -- licences ---------------------------------------------------------------------------------------

def licence_pending(model_id: str) -> bool:
    """True while the model's weights licence needs acceptance and the user has not accepted it."""
    s = spec(model_id)
    return licences.get(s.licence).needs_acceptance and s.licence not in licences.accepted()


def licence_notice(model_id: str) -> str:
    s = spec(model_id)
    return licences.notice(s.licence, s.display_name)


def accept_licence(model_id: str) -> bool:
    s = spec(model_id)
    return licences.accept(s.licence, s.id)


# -- files ------------------------------------------------------------------------------------------

def files_present(folder: Path, model_id: str) -> bool:
    """Every file of the model in ``folder``, with its published size where the registry has one."""
    if model_id == U2NET:
        return (folder / "u2net.onnx").is_file()
    for f in spec(model_id).files:
        path = folder / f.path
        if not path.is_file() or (f.size is not None and path.stat().st_size != f.size):
            return False
    return True


def user_folder_for(model_id: str, weights_dir: str) -> Path | None:
    """The Model Folder preference as the worker is given it: the model's sub-folder, or the folder itself
    when it holds the model's files; None when it has neither (the store and the HF cache are searched)."""
    if not weights_dir:
        return None
    folder = Path(weights_dir)
    if not folder.is_dir():
        return folder  # the backend says it is not there
    nested = folder / spec(model_id).id
    if nested.is_dir():
        return nested
    if (folder / model_id).is_dir():
        return folder / model_id
    names = spec(model_id).file_names
    if all((folder / name).is_file() for name in names):
        return folder
    return None


def where_is(model_id: str, store: Path, weights_dir: str = "") -> tuple[str, Path | None]:
    """('folder' | 'store' | 'cache' | '', folder): where the worker will find the model's files."""
    if model_id != U2NET:
        folder = user_folder_for(model_id, weights_dir)
        if folder is not None and all((folder / n).is_file() for n in spec(model_id).file_names):
            return "folder", folder
    stored = Path(store) / (U2NET if model_id == U2NET else spec(model_id).id)
    if files_present(stored, model_id):
        return "store", stored
    if model_id == U2NET:
        rembg = Path.home() / ".u2net" / "u2net.onnx"
        return ("cache", rembg.parent) if rembg.is_file() else ("", None)
    for snapshot in registry.hf_cache_folders(spec(model_id)):
        if files_present(snapshot, model_id):
            return "cache", snapshot
    return "", None


def files_to_fetch(model_id: str, store: Path | None = None) -> list:
    """The model's files; with ``store``, only those not there yet (nor shared from another model's there)."""
    s = spec(model_id)
    return list(s.files) if store is None else registry.missing_files(s, store)


def download_size(model_id: str, store: Path | None = None) -> int:
    """Bytes to download: exact where the registry knows every size, else about."""
    return U2NET_SIZE if model_id == U2NET else registry.approx_size(files_to_fetch(model_id, store))


def size_text(model_id: str, store: Path | None = None) -> str:
    if model_id == U2NET:
        return "about " + hub.human_size(U2NET_SIZE)
    files = files_to_fetch(model_id, store)
    exact = all(f.size is not None for f in files)
    return ("" if exact else "about ") + hub.human_size(registry.approx_size(files))


def partial_bytes(model_id: str, store: Path) -> int:
    """Bytes already fetched by an interrupted download (kept to resume)."""
    folder = Path(store) / (U2NET if model_id == U2NET else spec(model_id).id)
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.glob("*.partial"))


# -- the backend environment --------------------------------------------------------------------------

def check_summary(report: dict | None, error: str = "") -> tuple[str, str, list[str]]:
    """(level, status line, what to do) from ``python -m backend check``'s JSON; level is OK, WARNING or ERROR."""
    if report is None:
        return "ERROR", error or "The backend Python did not answer", [
            "Install backend creates an environment with everything needed,",
            "or choose a Python with torch and backend/requirements.txt (Use existing Python)."]
    python = report.get("python", {}).get("version", "?")
    torch = report.get("torch") or {}
    missing = report.get("missing") or []
    if missing:
        todo = ["Click Install backend (or install them into this Python)."]
        if torch.get("error") and torch.get("installed"):
            todo.insert(0, f"torch is installed but does not load: {torch['error'][:120]}")
        return "ERROR", f"Python {python}: missing {', '.join(missing)}", todo
    device = report.get("device", "cpu")
    gpus = torch.get("gpus") or []
    if gpus:
        where = ", ".join(f"{g['name']} ({g['memory_total_mb'] / 1024:.0f} GB)" for g in gpus)
    elif device == "mps":
        where = "Apple GPU (Metal)"
    else:
        where = "CPU only"
    line = f"Ready: Python {python}, torch {torch.get('version')}, {where}"
    todo = []
    if device == "cpu" and not gpus:
        todo.append("No GPU is usable: generation runs on the CPU (slow). With an NVIDIA GPU, install the "
                    "CUDA build (Install backend, PyTorch build CUDA) and check the driver.")
        return "WARNING", line, todo
    return "OK", line, todo


def store_env(store: Path, *, online: bool, token: str = "") -> dict:
    """What the worker and the download processes get on top of their base environment."""
    env = {"IMAGE_TO_3D_MODELS": str(store)}
    if not online:
        env.update(HF_HUB_OFFLINE="1", IMAGE_TO_3D_OFFLINE="1")
    if token:
        env["HF_TOKEN"] = token
    return env
