"""Choosing the reference image: open one from disk, or take the one shown in an Image Editor."""

import os

import bpy
from bpy.props import StringProperty
from bpy_extras.io_utils import ImportHelper


class IMAGE_TO_3D_OT_open_image(bpy.types.Operator, ImportHelper):
    """Open an image file as the reference image"""

    bl_idname = "image_to_3d.open_image"
    bl_label = "Open Image"
    bl_options = {"REGISTER", "UNDO"}

    filter_glob: StringProperty(default="*.png;*.jpg;*.jpeg;*.webp;*.bmp;*.tif;*.tiff;*.exr", options={"HIDDEN"})

    def execute(self, context):
        if not os.path.isfile(self.filepath):
            self.report({"ERROR"}, f"Not a file: {self.filepath}")
            return {"CANCELLED"}
        try:
            image = bpy.data.images.load(self.filepath, check_existing=True)
        except RuntimeError as exc:
            self.report({"ERROR"}, f"Cannot open {self.filepath}: {exc}")
            return {"CANCELLED"}
        context.scene.image_to_3d.image = image
        return {"FINISHED"}


def editor_image(context):
    """The image shown in an Image Editor of the current screen, if any."""
    screen = getattr(context, "screen", None)
    for area in (screen.areas if screen else ()):
        if area.type == "IMAGE_EDITOR":
            image = area.spaces.active.image
            if image is not None:
                return image
    return None


class IMAGE_TO_3D_OT_use_editor_image(bpy.types.Operator):
    """Use the image shown in the Image Editor as the reference image"""

    bl_idname = "image_to_3d.use_editor_image"
    bl_label = "From Image Editor"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        if editor_image(context) is None:
            cls.poll_message_set("No Image Editor shows an image")
            return False
        return True

    def execute(self, context):
        context.scene.image_to_3d.image = editor_image(context)
        return {"FINISHED"}


CLASSES = (IMAGE_TO_3D_OT_open_image, IMAGE_TO_3D_OT_use_editor_image)

register, unregister = bpy.utils.register_classes_factory(CLASSES)
