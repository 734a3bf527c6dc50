"""3D Viewport › Sidebar › Image to 3D."""

import bpy

from .. import environment, import_mesh, preferences, properties
from ..backend.client import catalog, session
from ..backend.protocol import Stage
from ..operators import bake, jobs

STAGE_LABELS = {
    Stage.BACKGROUND: "Removing background",
    Stage.LOAD: "Loading model",
    Stage.VIEWS: "Generating views",
    Stage.SHAPE: "Generating shape",
    Stage.ENCODE: "Encoding image",
    Stage.TRIPLANE: "Building triplanes",
    Stage.FIELD: "Recomputing the field",
    Stage.SURFACE: "Extracting surface",
    Stage.COLOR: "Colouring",
    Stage.REDUCE: "Reducing",
    Stage.UNWRAP: "Unwrapping",
    Stage.BAKE: "Baking texture",
    Stage.PAINT: "Painting from the images",
    Stage.QUEUED: "Waiting for the server",
}


SIDEBAR_WIDTH = 42  # characters per label line in the sidebar


def wrapped(layout, text: str, icon: str = "NONE"):
    preferences.wrapped(layout, text, SIDEBAR_WIDTH, icon)


def draw_image(layout, settings):
    """The single image (a picker and its thumbnail), or the batch chosen instead."""
    if not settings.batch:
        layout.template_ID(settings, "image", open="image.open")
    row = layout.row(align=True)
    row.operator("image_to_3d.open_image", text="Open…", icon="FILEBROWSER")
    row.operator("image_to_3d.use_editor_image", icon="IMAGE")
    layout.operator("image_to_3d.open_batch", text="Open Batch…", icon="DOCUMENTS")
    if settings.batch:
        row = layout.box().row()
        row.label(text=f"{settings.batch_name}: {len(settings.batch)} images", icon="DOCUMENTS")
        row.operator("image_to_3d.clear_batch", text="", icon="X")
    elif settings.image is not None:
        layout.template_icon(icon_value=layout.icon(settings.image), scale=6.0)


def draw_progress(layout, job):
    label = STAGE_LABELS.get(job.stage, job.stage or "Starting backend")
    if job.cancel_requested_at is not None:
        label = "Cancelling…"
    text = f"{label} {job.fraction:.0%}"
    if jobs.batch_running():
        run = jobs.current_batch()
        text = f"Image {run.position} of {run.total} · {text}"
    if hasattr(layout, "progress"):  # Blender 4.0+
        layout.progress(factor=job.fraction, type="BAR", text=text)
    else:
        layout.label(text=text)
    if job.message:  # e.g. "view synthesis step 12/75"
        layout.label(text=job.message)
    layout.operator("image_to_3d.cancel", icon="CANCEL")


def draw_batch_failures(layout, context):
    """The images of the running (or last) batch that failed, each with its reason."""
    run = jobs.current_batch()
    if run is None or run.scene != context.scene.name or not run.failures:
        return
    box = layout.box()
    box.label(text=f"Failed: {len(run.failures)} of {run.total}", icon="ERROR")
    for file_name, reason in run.failures:
        wrapped(box, f"{file_name}: {reason}", icon="BLANK1")


def draw_outcome(layout, settings, context):
    if settings.last_error:
        box = layout.box()
        box.alert = True
        wrapped(box, settings.last_error, icon="ERROR")
        wrapped(box, settings.last_hint, icon="BLANK1")
    elif settings.last_info:
        layout.label(text=settings.last_info, icon="INFO")
    for note in settings.last_notes.splitlines():  # what post-processing did or fell back from
        wrapped(layout, note, icon="INFO")
    if not preferences.backend_python(context) and not preferences.uses_remote(context):
        box = layout.box()
        box.label(text="No backend Python set", icon="ERROR")
        box.label(text="See Preferences › Add-ons › Image to 3D")


def draw_model(layout, settings, context):
    """The model, its licence (Accept once) and whether its files are here."""
    layout.prop(settings, "model")
    model_id = settings.model
    if catalog.licence_pending(model_id):
        box = layout.box()
        wrapped(box, catalog.licence_notice(model_id), icon="INFO")
        op = box.operator("image_to_3d.accept_licence", text="Accept Licence", icon="CHECKMARK")
        op.model = model_id
        return
    prefs = preferences.get(context)
    weights_dir = bpy.path.abspath(prefs.weights_dir) if prefs and prefs.weights_dir else ""
    store = environment.model_store()
    missing = [] if catalog.where_is(model_id, store, weights_dir)[0] else [(model_id, "Weights")]
    if settings.remove_background and not catalog.where_is(catalog.U2NET, store)[0]:
        missing.append((catalog.U2NET, "Background removal model"))
    for file_id, what in missing:
        row = layout.row()
        row.label(text=f"{what} not downloaded ({catalog.size_text(file_id, store)})", icon="ERROR")
        task = environment.running(f"download:{file_id}")
        if task is not None:
            row.label(text=f"Downloading {task.fraction:.0%}")
        else:
            op = row.operator("image_to_3d.download_model", text="Download", icon="IMPORT")
            op.model = file_id


def draw_value(layout, settings, name: str):
    """A model-default value: dimmed while it follows the model, with a toggle to keep your own."""
    row = layout.row(align=True)
    sub = row.row(align=True)
    sub.active = getattr(settings, f"use_custom_{name}")
    sub.prop(settings, name)
    row.prop(settings, f"use_custom_{name}", text="", icon="DECORATE_OVERRIDE" if getattr(
        settings, f"use_custom_{name}") else "DECORATE_LINKED")


def draw_output(layout, settings):
    """What is made from the field: a face budget (quads only with one) and a texture."""
    col = layout.column(align=True)
    col.label(text="Output", icon="MESH_DATA")
    col.prop(settings, "faces")
    row = col.row(align=True)
    row.enabled = settings.faces > 0
    row.prop(settings, "quads")
    col.prop(settings, "texture")
    col.prop(settings, "colours")
    problem = properties.faces_problem(settings)
    if problem:
        box = layout.box()
        box.alert = True
        wrapped(box, problem, icon="ERROR")


def draw_generated_object(layout, settings, context):
    """Bake from Model and Retopologize, for the active object when Image to 3D made it."""
    obj = context.active_object
    stored = import_mesh.stored_settings(obj)
    if stored is None:
        return
    box = layout.box()
    box.label(text=obj.name, icon="OBJECT_DATA")
    col = box.column(align=True)
    col.operator("image_to_3d.bake_from_model", icon="TEXTURE",
                 text=f"Bake from Model ({bake.bake_size(settings, stored)} px)")
    col.operator("image_to_3d.retopologize", icon="MOD_REMESH")
    if stored.get("colour_views"):
        wrapped(box, f"Painted from {stored['colour_views']}", icon="IMAGE_DATA")


def runs_on_cpu(settings, context) -> bool:
    """Whether the job will run on the CPU, as far as the settings and the last environment check say."""
    prefs = preferences.get(context)
    device = settings.device if settings.device != "DEFAULT" else (prefs.device if prefs else "auto")
    if preferences.uses_remote(context):
        return False  # the server's device: its GPUs
    if device != "auto":
        return device == "cpu"
    check = environment.check_of(preferences.backend_python(context))
    report = (check or {}).get("report") or {}
    return report.get("device") == "cpu"


def draw_view_settings(layout, settings, context):
    """A diffusion model's steps: stage 1 of a multi-view model (six views, kept as an image afterwards), or
    TripoSG's shape drawn from noise."""
    views = catalog.draws_views(settings.model)
    col = layout.column(align=True)
    col.label(text="Six views, then the mesh" if views else "The shape, drawn from noise",
              icon="IMAGE_REFERENCE" if views else "MESH_ICOSPHERE")
    for name in properties.VIEW_SETTINGS:
        col.prop(settings, name)
    if runs_on_cpu(settings, context):
        step = "tens of seconds" if views else "minutes (guidance 1: half that)"
        wrapped(layout.box(), f"On the CPU each of the {settings.steps} steps takes {step}: use a GPU, "
                "or fewer steps for a draft", icon="INFO")


class SidebarTab:
    """Where both panels live: the 3D viewport's sidebar, in the Image to 3D tab."""

    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Image to 3D"


class IMAGE_TO_3D_PT_sidebar(SidebarTab, bpy.types.Panel):
    bl_label = "Image to 3D"
    bl_idname = "IMAGE_TO_3D_PT_sidebar"

    def draw(self, context):
        layout = self.layout
        settings = getattr(context.scene, "image_to_3d", None)
        if settings is None:
            return
        draw_image(layout, settings)

        draw_model(layout, settings, context)
        if catalog.draws_samples(settings.model):
            draw_view_settings(layout, settings, context)
        col = layout.column(align=True)
        for name in properties.customizable(settings.model):
            draw_value(col, settings, name)
        col.prop(settings, "remove_background")
        col.prop(settings, "device")
        draw_output(layout, settings)
        col = layout.column(align=True)
        col.prop(settings, "smooth_shading")
        col.prop(settings, "target_height")

        job = session.current_job()
        busy = job is not None and not job.finished
        if busy:  # whichever job runs: Generate 3D, Bake from Model or Retopologize
            draw_progress(layout, job)
        elif settings.batch:
            layout.operator("image_to_3d.generate", text=f"Generate 3D ({len(settings.batch)} images)",
                            icon="MESH_MONKEY")
        else:
            layout.operator("image_to_3d.generate", icon="MESH_MONKEY")
        draw_batch_failures(layout, context)
        draw_outcome(layout, settings, context)
        if not busy:
            draw_generated_object(layout, settings, context)
        layout.operator("image_to_3d.free_memory", icon="TRASH")


class IMAGE_TO_3D_PT_advanced(SidebarTab, bpy.types.Panel):
    bl_label = "Advanced"
    bl_idname = "IMAGE_TO_3D_PT_advanced"
    bl_parent_id = "IMAGE_TO_3D_PT_sidebar"
    bl_options = {"DEFAULT_CLOSED"}

    @classmethod
    def poll(cls, context):
        settings = getattr(context.scene, "image_to_3d", None)
        return settings is not None

    def draw(self, context):
        layout = self.layout
        settings = getattr(context.scene, "image_to_3d", None)
        if settings is None:
            return
        layout.prop(settings, "precision")
        if catalog.draws_samples(settings.model):
            return  # the views (TripoSG: its encoder's input) have a fixed size: no source size to set
        layout.prop(settings, "source_size")
        values = properties.effective(settings)
        layout.label(text=f"Encoder input: {values['source_size']} px" if not settings.source_size
                     else f"Model's own: {catalog.defaults(settings.model)['source_size']} px")
        problem = properties.source_size_problem(settings)
        if problem:
            box = layout.box()
            box.alert = True
            wrapped(box, problem, icon="ERROR")


CLASSES = (IMAGE_TO_3D_PT_sidebar, IMAGE_TO_3D_PT_advanced)

register, unregister = bpy.utils.register_classes_factory(CLASSES)
