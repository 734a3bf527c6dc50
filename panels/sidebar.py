"""3D Viewport › Sidebar › Image to 3D."""

import bpy

from .. import preferences, session

STAGE_LABELS = {
    "removing_background": "Removing background",
    "loading_model": "Loading model",
    "encoding": "Encoding image",
    "building_triplanes": "Building triplanes",
    "extracting_surface": "Extracting surface",
    "colouring": "Colouring",
}


def wrapped_lines(text: str, width: int = 42):
    line = ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            yield line
            line = word
        else:
            line = f"{line} {word}".strip()
    if line:
        yield line


def draw_image(layout, settings):
    layout.template_ID(settings, "image", open="image.open")
    row = layout.row(align=True)
    row.operator("image_to_3d.open_image", text="Open…", icon="FILEBROWSER")
    row.operator("image_to_3d.use_editor_image", icon="IMAGE")
    if settings.image is not None:
        layout.template_icon(icon_value=layout.icon(settings.image), scale=6.0)


def draw_progress(layout, job):
    label = STAGE_LABELS.get(job.stage, job.stage or "Starting backend")
    if job.cancel_requested_at is not None:
        label = "Cancelling…"
    if hasattr(layout, "progress"):  # Blender 4.0+
        layout.progress(factor=job.fraction, type="BAR", text=f"{label} {job.fraction:.0%}")
    else:
        layout.label(text=f"{label} {job.fraction:.0%}")
    layout.operator("image_to_3d.cancel", icon="CANCEL")


def draw_outcome(layout, settings, context):
    if settings.last_error:
        box = layout.box()
        box.alert = True
        for i, line in enumerate(wrapped_lines(settings.last_error)):
            box.label(text=line, icon="ERROR" if i == 0 else "BLANK1")
        for line in wrapped_lines(settings.last_hint):
            box.label(text=line, icon="BLANK1")
    elif settings.last_info:
        layout.label(text=settings.last_info, icon="INFO")
    if not preferences.backend_python(context):
        box = layout.box()
        box.label(text="No backend Python set", icon="ERROR")
        box.label(text="See Preferences › Add-ons › Image to 3D")


class IMAGE_TO_3D_PT_sidebar(bpy.types.Panel):
    bl_label = "Image to 3D"
    bl_idname = "IMAGE_TO_3D_PT_sidebar"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Image to 3D"

    def draw(self, context):
        layout = self.layout
        settings = getattr(context.scene, "image_to_3d", None)
        if settings is None:
            return
        draw_image(layout, settings)

        col = layout.column(align=True)
        col.prop(settings, "model")
        col.prop(settings, "resolution")
        col.prop(settings, "foreground_ratio")
        col.prop(settings, "remove_background")
        col.prop(settings, "device")
        col = layout.column(align=True)
        col.prop(settings, "smooth_shading")
        col.prop(settings, "target_height")

        job = session.current_job()
        if job is not None and not job.finished:
            draw_progress(layout, job)
        else:
            layout.operator("image_to_3d.generate", icon="MESH_MONKEY")
        draw_outcome(layout, settings, context)
        layout.operator("image_to_3d.free_memory", icon="TRASH")


def register():
    bpy.utils.register_class(IMAGE_TO_3D_PT_sidebar)


def unregister():
    bpy.utils.unregister_class(IMAGE_TO_3D_PT_sidebar)
