"""Model files from the preferences: Download (with progress, Cancel, resume) and Accept Licence.

A download is ``<Blender's Python> -m backend download --model M --store <model store> --json``: the
backend's downloader is standard-library only, so it runs before any backend environment exists. It never
starts while Blender's *Allow Online Access* is off.
"""

import bpy
from bpy.props import BoolProperty, StringProperty

from .. import environment, preferences
from ..backend.client import catalog
from ..backend.hub import human_size


def key_for(model_id: str) -> str:
    return f"download:{model_id}"


def _known(model_id: str) -> bool:
    if model_id == catalog.U2NET:
        return True
    try:
        catalog.spec(model_id)
        return True
    except Exception:  # noqa: BLE001 - InputError from the registry
        return False


class IMAGE_TO_3D_OT_download_model(bpy.types.Operator):
    """Download the model's files into the extension's model store, verified (size and sha256); an interrupted
    download resumes"""

    bl_idname = "image_to_3d.download_model"
    bl_label = "Download"
    bl_options = {"REGISTER", "INTERNAL"}

    model: StringProperty(name="Model", options={"HIDDEN"})
    run_async: BoolProperty(name="Return at Once", default=False, options={"HIDDEN", "SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        if not environment.online():
            cls.poll_message_set(environment.offline_reason())
            return False
        return True

    def execute(self, context):
        model_id = self.model
        if not environment.online():  # poll is not consulted by every caller
            self.report({"ERROR"}, environment.offline_reason())
            return {"CANCELLED"}
        if not _known(model_id):
            self.report({"ERROR"}, f"Unknown model {model_id!r}")
            return {"CANCELLED"}
        if model_id != catalog.U2NET and catalog.licence_pending(model_id):
            self.report({"ERROR"}, f"Accept the licence of {catalog.spec(model_id).display_name} first")
            return {"CANCELLED"}
        key = key_for(model_id)
        if environment.running(key):
            self.report({"WARNING"}, "Already downloading")
            return {"CANCELLED"}
        prefs = preferences.get(context)
        store = environment.model_store()

        def done(task):
            if task.state == "done":
                environment.OUTCOMES[key] = {"level": "INFO", "message": "Downloaded and verified", "hint": ""}
            elif task.state == "cancelled":
                kept = catalog.partial_bytes(model_id, store)
                environment.OUTCOMES[key] = {"level": "INFO",
                                             "message": f"Cancelled; {human_size(kept)} kept",
                                             "hint": "Download again resumes where it stopped"}
            else:
                error = task.error or {}
                environment.OUTCOMES[key] = {"level": "ERROR", "message": error.get("message") or "Download failed",
                                             "hint": error.get("hint") or task.log_tail(1)}

        args = ["download", "--model", model_id, "--store", store, "--json"]
        task = environment.new_task("download", environment.blender_python(), args, prefs, key=key,
                                    expected_total=catalog.download_size(model_id))
        environment.start(key, task, done, block=bpy.app.background and not self.run_async)
        if task.finished:
            outcome = environment.OUTCOMES[key]
            if outcome["level"] == "ERROR":
                self.report({"ERROR"}, f"{outcome['message']} ({outcome['hint']})" if outcome["hint"]
                            else outcome["message"])
                return {"CANCELLED"}
            self.report({"INFO"}, outcome["message"])
        return {"FINISHED"}


class IMAGE_TO_3D_OT_accept_licence(bpy.types.Operator):
    """Accept the licence of the model's weights (remembered for every model under the same licence)"""

    bl_idname = "image_to_3d.accept_licence"
    bl_label = "Accept Licence"
    bl_options = {"REGISTER", "INTERNAL"}

    model: StringProperty(name="Model", options={"HIDDEN"})

    @classmethod
    def description(cls, context, properties):
        try:
            return catalog.licence_notice(properties.model) + " Click to accept it."
        except Exception:  # noqa: BLE001
            return cls.__doc__

    def execute(self, context):
        if not _known(self.model) or self.model == catalog.U2NET:
            self.report({"ERROR"}, f"Unknown model {self.model!r}")
            return {"CANCELLED"}
        try:
            catalog.accept_licence(self.model)
        except OSError as exc:
            self.report({"ERROR"}, f"Could not record the acceptance: {exc}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"Licence {catalog.spec(self.model).licence} accepted")
        environment.redraw()
        return {"FINISHED"}


CLASSES = (IMAGE_TO_3D_OT_download_model, IMAGE_TO_3D_OT_accept_licence)

register, unregister = bpy.utils.register_classes_factory(CLASSES)
