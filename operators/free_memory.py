"""Free Memory: stop the backend worker, which releases every model and all (V)RAM it holds."""

import bpy

from .. import session


class IMAGE_TO_3D_OT_free_memory(bpy.types.Operator):
    """Stop the backend process and free the memory of loaded models (the next generation loads them again)"""

    bl_idname = "image_to_3d.free_memory"
    bl_label = "Free Memory"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context):
        if session.is_busy():
            cls.poll_message_set("Cancel the running generation first")
            return False
        if not session.worker_running():
            cls.poll_message_set("The backend is not running")
            return False
        return True

    def execute(self, context):
        session.stop()
        self.report({"INFO"}, "Backend stopped, memory freed")
        return {"FINISHED"}


def register():
    bpy.utils.register_class(IMAGE_TO_3D_OT_free_memory)


def unregister():
    bpy.utils.unregister_class(IMAGE_TO_3D_OT_free_memory)
