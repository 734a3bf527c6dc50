"""Free Memory: stop the backend worker, which releases every model and all (V)RAM it holds."""

import bpy

from .. import preferences
from ..backend.client import session

REMOTE = ("The shared server holds the models' memory (it keeps them loaded for every artist): Free Memory is "
          "for the Local backend")


def why_not(context) -> str:
    """Why Free Memory cannot run now ('' when it can)."""
    if preferences.uses_remote(context):
        return REMOTE
    if session.is_busy():
        return "Cancel the running generation first"
    if not session.worker_running():
        return "The backend is not running"
    return ""


class IMAGE_TO_3D_OT_free_memory(bpy.types.Operator):
    """Stop the backend process and free the memory of loaded models (the next generation loads them again)"""

    bl_idname = "image_to_3d.free_memory"
    bl_label = "Free Memory"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context):
        reason = why_not(context)
        if reason:
            cls.poll_message_set(reason)
        return not reason

    def execute(self, context):
        session.stop()
        self.report({"INFO"}, "Backend stopped, memory freed")
        return {"FINISHED"}


CLASSES = (IMAGE_TO_3D_OT_free_memory,)
register, unregister = bpy.utils.register_classes_factory(CLASSES)
