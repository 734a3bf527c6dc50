"""Generation settings and job status, at ``scene.image_to_3d``."""

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

from .preferences import DEVICE_ITEMS

# Blender-side list (the backend registry is not imported here: it is not stdlib-only).
MODEL_ITEMS = (
    ("triposr", "TripoSR", "Stability AI / Tripo: fast single-image reconstruction (MIT licence)"),
)


class ImageTo3DSettings(bpy.types.PropertyGroup):
    image: PointerProperty(name="Image", type=bpy.types.Image, description="The reference image")
    model: EnumProperty(name="Model", items=MODEL_ITEMS, default="triposr")
    resolution: IntProperty(name="Resolution", description="Marching-cubes grid size: more detail, more time",
                            default=256, min=32, max=1024, soft_min=64, soft_max=512, step=32)
    foreground_ratio: FloatProperty(name="Foreground Ratio",
                                    description="How much of the model's input square the object fills",
                                    default=0.85, min=0.5, max=1.0, subtype="FACTOR")
    remove_background: BoolProperty(name="Remove Background", default=True,
                                    description="Cut the object out of its background first (images without "
                                                "transparency need this)")
    device: EnumProperty(name="Device", items=(("DEFAULT", "Preferences", "The device set in the preferences"),)
                         + DEVICE_ITEMS, default="DEFAULT")
    smooth_shading: BoolProperty(name="Smooth Shading", default=True)
    target_height: FloatProperty(name="Height", description="Scale the result to this height (0: model units)",
                                 default=0.0, min=0.0, soft_max=10.0, unit="LENGTH")

    # The outcome of the last job, shown in the panel (the job in flight is read from the session).
    last_error: StringProperty(name="Last Error")
    last_hint: StringProperty(name="Hint")
    last_info: StringProperty(name="Last Result")


def register():
    bpy.utils.register_class(ImageTo3DSettings)
    bpy.types.Scene.image_to_3d = PointerProperty(type=ImageTo3DSettings)


def unregister():
    del bpy.types.Scene.image_to_3d
    bpy.utils.unregister_class(ImageTo3DSettings)
