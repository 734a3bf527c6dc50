"""Choosing the input: one reference image (from disk, or the one shown in an Image Editor), or a batch of
image files (several chosen in the file browser, or every image in a folder)."""

import os
import re

import bpy
from bpy.props import BoolProperty, CollectionProperty, StringProperty
from bpy_extras.io_utils import ImportHelper

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".exr")
FILTER_GLOB = ";".join(f"*{suffix}" for suffix in IMAGE_SUFFIXES)


def use_single_image(context, image) -> None:
    """The reference image; a batch chosen before is dropped (Generate 3D runs the one image again)."""
    settings = context.scene.image_to_3d
    settings.image = image
    settings.batch.clear()
    settings.batch_name = ""


def load_image(operator, context, path: str) -> set:
    if not os.path.isfile(path):
        operator.report({"ERROR"}, f"Not a file: {path}")
        return {"CANCELLED"}
    try:
        image = bpy.data.images.load(path, check_existing=True)
    except RuntimeError as exc:
        operator.report({"ERROR"}, f"Cannot open {path}: {exc}")
        return {"CANCELLED"}
    use_single_image(context, image)
    return {"FINISHED"}


class IMAGE_TO_3D_OT_open_image(bpy.types.Operator, ImportHelper):
    """Open an image file as the reference image"""

    bl_idname = "image_to_3d.open_image"
    bl_label = "Open Image"
    bl_options = {"REGISTER", "UNDO"}

    filter_glob: StringProperty(default=FILTER_GLOB, options={"HIDDEN"})

    def execute(self, context):
        return load_image(self, context, self.filepath)


def natural_key(name: str):
    """Sort key that puts "img2" before "img10", case aside (as Blender's file browser lists them)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.casefold())
            for part in re.split(r"(\d+)", name)]


def folder_images(folder: str) -> list:
    """Every image file in the folder (not its sub-folders, nor hidden files), sorted by name."""
    names = [name for name in os.listdir(folder)
             if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
             and os.path.isfile(os.path.join(folder, name))]
    return [os.path.join(folder, name) for name in sorted(names, key=natural_key)]


def batch_name(folder: str, paths: list, whole_folder: bool) -> str:
    """The name of the collection the batch's objects go in: the folder's, or "Batch <first image> +N"."""
    if whole_folder:
        return os.path.basename(os.path.normpath(folder)) or "Batch"
    return f"Batch {os.path.splitext(os.path.basename(paths[0]))[0]} +{len(paths) - 1}"


class IMAGE_TO_3D_OT_open_batch(bpy.types.Operator):
    """Choose several images to generate one after another: select them in the file browser, or select none \
to take every image in the folder"""

    bl_idname = "image_to_3d.open_batch"
    bl_label = "Open Batch"
    bl_options = {"REGISTER", "UNDO"}

    directory: StringProperty(subtype="DIR_PATH", options={"HIDDEN", "SKIP_SAVE"})
    files: CollectionProperty(type=bpy.types.OperatorFileListElement, options={"HIDDEN", "SKIP_SAVE"})
    filter_glob: StringProperty(default=FILTER_GLOB, options={"HIDDEN"})
    filter_folder: BoolProperty(default=True, options={"HIDDEN"})
    filter_image: BoolProperty(default=True, options={"HIDDEN"})

    def invoke(self, context, event):
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context):
        folder = bpy.path.abspath(self.directory)
        if not os.path.isdir(folder):
            self.report({"ERROR"}, f"Not a folder: {folder}")
            return {"CANCELLED"}
        names = sorted((f.name for f in self.files if f.name), key=natural_key)
        if names:
            paths = [os.path.join(folder, name) for name in names]
            missing = [path for path in paths if not os.path.isfile(path)]
            if missing:
                self.report({"ERROR"}, f"Not a file: {missing[0]}")
                return {"CANCELLED"}
            if len(paths) == 1:  # one file chosen: the single image, as Open Image does
                return load_image(self, context, paths[0])
        else:
            paths = folder_images(folder)
            if not paths:
                self.report({"ERROR"}, f"No images in {folder}")
                return {"CANCELLED"}
        settings = context.scene.image_to_3d
        settings.batch.clear()
        for path in paths:
            settings.batch.add().filepath = path
        settings.batch_name = batch_name(folder, paths, whole_folder=not names)
        self.report({"INFO"}, f"Batch '{settings.batch_name}': {len(paths)} images")
        return {"FINISHED"}


class IMAGE_TO_3D_OT_clear_batch(bpy.types.Operator):
    """Forget the batch: Generate 3D uses the single image again"""

    bl_idname = "image_to_3d.clear_batch"
    bl_label = "Clear Batch"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        settings = getattr(context.scene, "image_to_3d", None)
        if settings is None or not settings.batch:
            cls.poll_message_set("No batch is chosen")
            return False
        return True

    def execute(self, context):
        use_single_image(context, context.scene.image_to_3d.image)
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
        use_single_image(context, editor_image(context))
        return {"FINISHED"}


CLASSES = (IMAGE_TO_3D_OT_open_image, IMAGE_TO_3D_OT_open_batch, IMAGE_TO_3D_OT_clear_batch,
           IMAGE_TO_3D_OT_use_editor_image)

register, unregister = bpy.utils.register_classes_factory(CLASSES)
