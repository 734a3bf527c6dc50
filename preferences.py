"""Add-on preferences: the backend Python, the model folder, the default device."""

import bpy
from bpy.props import EnumProperty, StringProperty

from . import session

DEVICE_ITEMS = (
    ("auto", "Auto", "CUDA if available, then Apple Metal, then the CPU"),
    ("cpu", "CPU", "Run on the CPU (slow, but always works)"),
    ("cuda", "CUDA", "Run on the NVIDIA GPU"),
    ("mps", "Apple Metal", "Run on the Apple GPU"),
)


class ImageTo3DPreferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    backend_python: StringProperty(
        name="Backend Python",
        description="Python interpreter with torch and the backend requirements installed, which runs the "
                    "models in a separate process",
        subtype="FILE_PATH",
        default=session.default_backend_python(),
    )
    weights_dir: StringProperty(
        name="Model Folder",
        description="Folder with the model files: either one model's folder (config.yaml, model.ckpt) or a "
                    "folder holding one sub-folder per model id (e.g. triposr/). Empty: the Hugging Face cache",
        subtype="DIR_PATH",
        default="",
    )
    device: EnumProperty(name="Device", description="Where the models run by default", items=DEVICE_ITEMS,
                         default="auto")

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "backend_python")
        if not backend_python(context):
            box = layout.box()
            box.label(text="No backend Python set.", icon="ERROR")
            box.label(text="Run 'make venv' in the extension folder, or pick a Python 3.10+ with torch")
            box.label(text="and the packages of backend/requirements.txt installed.")
        layout.prop(self, "weights_dir")
        layout.prop(self, "device")


def get(context=None):
    context = context or bpy.context
    addon = context.preferences.addons.get(__package__)
    return addon.preferences if addon else None


def backend_python(context=None) -> str:
    """The interpreter to run the worker with: the preference, else the extension's own .venv."""
    prefs = get(context)
    path = bpy.path.abspath(prefs.backend_python) if prefs and prefs.backend_python else ""
    return path or session.default_backend_python()


def register():
    bpy.utils.register_class(ImageTo3DPreferences)


def unregister():
    bpy.utils.unregister_class(ImageTo3DPreferences)
