"""Generate 3D: the image (or each image of the batch, one after another) to a coloured mesh in the scene.

The job engine (submit, tick, finish, the batch queue) is :mod:`.jobs`; this file is the operator alone.
"""

from __future__ import annotations

import bpy

from .. import preferences, properties
from ..backend.client import session
from . import jobs, results
from .job_options import generation_settings, job_options


def why_not(context) -> str:
    """Why Generate 3D cannot run now ('' when it can)."""
    settings = getattr(context.scene, "image_to_3d", None)
    if settings is None:
        return "No scene"
    if session.is_busy() or jobs.batch_running():
        return "A generation is already running"
    if settings.image is None and not settings.batch:
        return "Choose an image first"
    return (jobs.licence_problem(settings.model) or properties.faces_problem(settings)
            or jobs.backend_problem(context))


class IMAGE_TO_3D_OT_generate(jobs.JobOperator, bpy.types.Operator):
    """Reconstruct a coloured mesh from the image (or from each image of the batch, one after another) \
with the chosen model, in a background process"""

    bl_idname = "image_to_3d.generate"
    bl_label = "Generate 3D"
    reason = staticmethod(why_not)

    def execute(self, context):
        settings = context.scene.image_to_3d
        jobs.forget_batch()  # the last batch's list of failed images goes with the next Generate
        options = job_options(settings, preferences.get(context))
        if settings.batch:
            paths = [bpy.path.abspath(item.filepath) for item in settings.batch]
            return jobs.begin_batch(self, context, paths, settings.batch_name, options,
                               generation_settings(settings, options))
        image = settings.image
        info = {
            "on_done": results.import_result,
            "undo": "Generate 3D",
            "settings": dict(generation_settings(settings, options), image=image.name),
        }
        return jobs.begin_job(self, context, lambda worker, staging: worker.submit(
            results.image_file_for_worker(image, staging), options), info)


CLASSES = (IMAGE_TO_3D_OT_generate,)
register, unregister = bpy.utils.register_classes_factory(CLASSES)
