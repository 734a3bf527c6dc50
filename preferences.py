"""Add-on preferences: the backend (Local: its environment's state, install, use an existing Python; or Remote: a
shared GPU server's URL and token), the models (where they are, downloads, licences), the default device."""

import os

import bpy
from bpy.props import EnumProperty, StringProperty

from . import environment
from .backend.client import catalog, health_summary, server_url, session
from .backend.hub import hub_cache, human_size

BACKEND_ITEMS = (
    ("LOCAL", "Local", "Run the models on this computer, in a backend process of their own"),
    ("REMOTE", "Remote", "Send the jobs to a shared GPU server (python -m backend cluster-serve): Generate 3D, "
                         "progress, Cancel and errors as locally. Needs Allow Online Access"),
)

DEVICE_ITEMS = (
    ("auto", "Auto", "CUDA if available, then Apple Metal, then the CPU"),
    ("cpu", "CPU", "Run on the CPU (slow, but always works)"),
    ("cuda", "CUDA", "Run on the NVIDIA GPU"),
    ("mps", "Apple Metal", "Run on the Apple GPU"),
)

TORCH_BUILD_ITEMS = (
    ("auto", "Auto", "Detected: CUDA with an NVIDIA driver, ROCm on Linux with AMD's ROCm, Apple Metal on "
                     "Apple Silicon, else CPU"),
    ("cuda", "CUDA", "NVIDIA GPUs (about 5 GB to download and install)"),
    ("rocm", "ROCm", "AMD GPUs on Linux"),
    ("mps", "Apple Metal", "Apple Silicon"),
    ("cpu", "CPU", "No GPU (smallest download)"),
)

LEVEL_ICONS = {"OK": "CHECKMARK", "WARNING": "ERROR", "ERROR": "CANCEL"}
WHERE_LABELS = {"folder": "in the Model Folder", "store": "downloaded", "cache": "in the Hugging Face cache"}


def wrapped_lines(text: str, width: int):
    line = ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            yield line
            line = word
        else:
            line = f"{line} {word}".strip()
    if line:
        yield line


def wrapped(layout, text: str, width: int = 90, icon: str = "NONE"):
    """Labels of at most ``width`` characters; the icon on the first, the others indented to match."""
    for i, line in enumerate(wrapped_lines(text, width)):
        layout.label(text=line, icon=icon if i == 0 else ("BLANK1" if icon != "NONE" else "NONE"))


def draw_task_progress(layout, task, text: str):
    row = layout.row(align=True)
    if hasattr(row, "progress"):  # Blender 4.0+
        row.progress(factor=task.fraction, type="BAR", text=text)
    else:
        row.label(text=text)
    op = row.operator("image_to_3d.cancel_task", text="", icon="CANCEL")
    op.key = task.key


def draw_outcome(layout, key: str):
    outcome = environment.OUTCOMES.get(key)
    if not outcome:
        return
    box = layout.box()
    box.alert = outcome["level"] == "ERROR"
    wrapped(box, outcome["message"], icon="ERROR" if outcome["level"] == "ERROR" else "INFO")
    if outcome.get("hint"):
        wrapped(box, outcome["hint"], icon="BLANK1")


def download_text(task) -> str:
    total = f" of {human_size(task.bytes_total)}" if task.bytes_total else (
        f" of about {human_size(task.expected_total)}" if task.expected_total else "")
    rate = f" at {human_size(int(task.rate))}/s" if task.rate else ""
    return f"{human_size(task.bytes_done)}{total}{rate}" if task.bytes_done else "Connecting…"


class ImageTo3DPreferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    backend_python: StringProperty(
        name="Backend Python",
        description="Python interpreter with torch and the backend requirements installed, which runs the "
                    "models in a separate process (Install Backend sets it)",
        subtype="FILE_PATH",
        default=session.default_backend_python(),
    )
    weights_dir: StringProperty(
        name="Model Folder",
        description="Your own folder with model files: either one model's folder (e.g. config.yaml, model.ckpt) "
                    "or a folder holding one sub-folder per model id (e.g. triposr/). Searched first; then the "
                    "extension's model store (where Download puts files), then the Hugging Face cache",
        subtype="DIR_PATH",
        default="",
    )
    device: EnumProperty(name="Device", description="Where the models run by default", items=DEVICE_ITEMS,
                         default="auto")
    torch_build: EnumProperty(name="PyTorch Build", description="Which PyTorch Install Backend installs",
                              items=TORCH_BUILD_ITEMS, default="auto")
    package_index_url: StringProperty(
        name="Package Index URL",
        description="Package index (a mirror or proxy) for the backend's requirements, passed to pip as "
                    "--index-url. Empty: pip's default", default="")
    wheels_dir: StringProperty(
        name="Wheelhouse Folder",
        description="Install the backend from this folder of wheels alone, with no internet (a studio's offline "
                    "install: make wheelhouse, plus a torch wheel for this machine). Empty: from the package indexes",
        subtype="DIR_PATH", default="")
    torch_index_url: StringProperty(
        name="PyTorch Index URL",
        description="Package index for PyTorch. Empty: PyTorch's own index for the chosen build; 'pip': pip's "
                    "own configuration", default="")
    backend: EnumProperty(name="Backend", description="Where the models run", items=BACKEND_ITEMS, default="LOCAL")
    server_url: StringProperty(
        name="Server URL",
        description="The shared server's address, as cluster-serve printed it (e.g. http://gpu-box:8765, or "
                    "https://... behind a TLS reverse proxy)", default="")
    server_token: StringProperty(
        name="Token",
        description="The shared server's token (printed on its first start, kept in its token file). Sent with each "
                    "request (Authorization: Bearer), never on a command line",
        subtype="PASSWORD", default="")
    hf_token: StringProperty(
        name="Hugging Face Token",
        description="Hugging Face access token, for gated model repositories (optional; accept the terms on the "
                    "model's page first). Given to the download process alone, in its environment (HF_TOKEN), "
                    "never on a command line",
        subtype="PASSWORD", default="")

    def draw(self, context):
        layout = self.layout
        prefs = get(context) or self  # the stored preferences (tests call draw with a stand-in self)
        draw_backend(prefs, layout.box(), context)
        draw_models(prefs, layout.box(), context)
        layout.prop(prefs, "device")


def draw_backend(prefs, box, context):
    box.row().prop(prefs, "backend", expand=True)
    if prefs.backend == "REMOTE":
        draw_remote(prefs, box)
        return
    box.label(text="Backend Environment", icon="CONSOLE")
    box.prop(prefs, "backend_python")
    python = backend_python(context)
    check = environment.check_of(python)
    if environment.running("check"):
        box.label(text="Checking the backend Python…", icon="SORTTIME")
    elif not python:
        box.label(text="No backend Python yet: click Install Backend (or Use Existing Python)", icon="ERROR")
    elif not os.path.isfile(python):
        box.label(text=f"Not found: {python}", icon="ERROR")
    elif check is None:
        box.label(text="Not checked yet: click Check", icon="QUESTION")
    else:
        box.label(text=check["line"], icon=LEVEL_ICONS[check["level"]])
        for line in check["todo"]:
            wrapped(box, line, icon="BLANK1")
    row = box.row(align=True)
    row.operator("image_to_3d.check_backend", icon="FILE_REFRESH")
    row.operator("image_to_3d.install_backend", icon="IMPORT")
    row.operator("image_to_3d.use_existing_python", icon="FILEBROWSER")
    task = environment.running("install")
    if task is not None:
        draw_task_progress(box, task, f"{task.message or 'Starting'} {task.fraction:.0%}")
    draw_outcome(box, "install")
    draw_outcome(box, "use_existing")
    col = box.column()
    col.use_property_split = True
    col.prop(prefs, "torch_build")
    col.prop(prefs, "wheels_dir")
    sub = col.column()
    sub.active = not prefs.wheels_dir.strip()  # a wheelhouse needs no index
    sub.prop(prefs, "package_index_url")
    sub.prop(prefs, "torch_index_url")
    col.label(text=f"Installs into {environment.backend_env_dir()}")


def draw_remote(prefs, box):
    """The shared server: where it is, the token, and what Check found it offers."""
    box.label(text="Shared GPU Server", icon="NETWORK_DRIVE")
    col = box.column()
    col.active = environment.online()
    col.prop(prefs, "server_url")
    col.prop(prefs, "server_token")
    problem = remote_problem(prefs)
    check = remote_check(prefs.server_url)
    if problem:
        wrapped(box, problem, icon="INTERNET_OFFLINE" if not environment.online() else "ERROR")
    elif environment.running("check"):
        box.label(text="Asking the server…", icon="SORTTIME")
    elif check is None:
        box.label(text="Not checked yet: click Check", icon="QUESTION")
    else:
        wrapped(box, check["line"], icon=LEVEL_ICONS[check["level"]])
        for line in check["todo"]:
            wrapped(box, line, icon="BLANK1")
    box.operator("image_to_3d.check_backend", icon="FILE_REFRESH")


def draw_models(prefs, box, context):
    box.label(text="Models", icon="MESH_MONKEY")
    box.prop(prefs, "weights_dir")
    store = environment.model_store()
    box.label(text=f"Model store (Download puts files here): {store}")
    box.label(text=f"Downloads go into the Hugging Face cache, linked from there: {hub_cache()}")
    if not environment.online():
        wrapped(box, environment.offline_reason() + ". Put the files into the folders named in the "
                "messages, or allow online access.", icon="INTERNET_OFFLINE")
    shown_notices = set()
    for model_id, name in [(s.id, s.display_name) for s in catalog.specs()] + [(catalog.U2NET,
                                                                              "Background removal (u2net)")]:
        col = box.column(align=True)
        row = col.row(align=True)
        row.label(text=name)
        where, folder = catalog.where_is(model_id, store, bpy.path.abspath(prefs.weights_dir)
                                         if prefs.weights_dir else "")
        key = f"download:{model_id}"
        task = environment.running(key)
        pending = model_id != catalog.U2NET and catalog.licence_pending(model_id)
        if where:
            row.label(text=f"Ready, {WHERE_LABELS[where]}", icon="CHECKMARK")
        else:
            kept = catalog.partial_bytes(model_id, store)
            size = catalog.size_text(model_id, store)
            row.label(text=f"Missing ({size}{f', {human_size(kept)} fetched' if kept else ''})", icon="BLANK1")
        if task is not None:
            draw_task_progress(col, task, download_text(task))
        elif pending:
            op = row.operator("image_to_3d.accept_licence", text="Accept Licence…")
            op.model = model_id
            lic = catalog.spec(model_id).licence
            if lic not in shown_notices:
                shown_notices.add(lic)
                wrapped(col, catalog.licence_notice(model_id), icon="INFO")
        elif not where:
            op = row.operator("image_to_3d.download_model", text="Download", icon="IMPORT")
            op.model = model_id
        draw_outcome(col, key)
    box.prop(prefs, "hf_token")


def uses_remote(context=None) -> bool:
    prefs = get(context)
    return prefs is not None and prefs.backend == "REMOTE"


def remote_problem(prefs) -> str:
    """Why the Remote backend cannot be used now ('' when it can)."""
    if not environment.online():
        return environment.offline_reason().replace("downloads are disabled", "the Remote backend is disabled")
    if not prefs.server_url.strip():
        return "Set the Server URL of the shared GPU server (Preferences › Add-ons › Image to 3D › Backend)"
    try:
        server_url(prefs.server_url)
    except ValueError as e:
        return str(e)
    return ""


def remote_server(context=None) -> tuple | None:
    """(url, token) of the shared server when the Remote backend is chosen, else None (the local worker)."""
    prefs = get(context)
    if prefs is None or prefs.backend != "REMOTE":
        return None
    return prefs.server_url.strip(), prefs.server_token.strip()


def backend_problem(context) -> str:
    """Why no job can be sent to the backend now ('' when one can): a Remote backend needs its URL and online
    access, the Local one its Python."""
    prefs = get(context)
    if prefs is not None and prefs.backend == "REMOTE":
        return remote_problem(prefs)
    python = backend_python(context)
    if not python:
        return "Set up the backend first: Install Backend or Use Existing Python, in the add-on preferences"
    if not os.path.isfile(python):
        return f"Backend Python not found: {python}"
    return ""


def remote_check_key(url: str) -> str:
    return f"remote:{url.strip().rstrip('/')}"


def remote_check(url: str) -> dict | None:
    """What the last Check found at ``url``: {"level", "line", "todo", "report"} (environment.CHECKS)."""
    return environment.CHECKS.get(remote_check_key(url))


def record_remote_check(url: str, task) -> dict:
    report = (task.result or {}).get("health") if task.state == "done" else None
    level, line, todo = health_summary(report, task.error)
    environment.CHECKS[remote_check_key(url)] = {"level": level, "line": line, "todo": todo, "report": report}
    return environment.CHECKS[remote_check_key(url)]


def get(context=None):
    context = context or bpy.context
    addon = context.preferences.addons.get(__package__)
    return addon.preferences if addon else None


def backend_python(context=None) -> str:
    """The interpreter to run the worker with: the preference, else a development checkout's .venv, else
    the managed environment if Install Backend made one."""
    prefs = get(context)
    path = bpy.path.abspath(prefs.backend_python) if prefs and prefs.backend_python else ""
    return path or session.default_backend_python() or managed_python()


def managed_python() -> str:
    env = environment.backend_env_dir()
    for candidate in (env / "bin" / "python", env / "Scripts" / "python.exe"):
        if candidate.is_file():
            return str(candidate)
    return ""


def register():
    bpy.utils.register_class(ImageTo3DPreferences)


def unregister():
    bpy.utils.unregister_class(ImageTo3DPreferences)
