"""Cancel the job in flight: cooperative first, the worker is killed if it does not stop in time. A batch
starts no further image; the objects it made stay."""

import bpy

from ..backend.client import session
from . import jobs


class IMAGE_TO_3D_OT_cancel(bpy.types.Operator):
    """Stop the running generation (and the rest of a batch)"""

    bl_idname = "image_to_3d.cancel"
    bl_label = "Cancel"
    bl_options = {"REGISTER", "INTERNAL"}

    @classmethod
    def poll(cls, context):
        if not session.is_busy():
            cls.poll_message_set("No generation is running")
            return False
        return True

    def execute(self, context):
        jobs.cancel_batch()
        session.current().cancel()
        return {"FINISHED"}


CLASSES = (IMAGE_TO_3D_OT_cancel,)
register, unregister = bpy.utils.register_classes_factory(CLASSES)
