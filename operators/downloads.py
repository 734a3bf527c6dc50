"""Model files from the preferences: Download (with progress and Cancel) and Accept Licence.

A download is ``<backend Python> -m backend download --model M --store <model store> --json``, a one-shot
backend command as Check is: it needs ``huggingface_hub``, which the backend's environment has and Blender's
Python does not, so before a backend exists Download says to install one (bundling the library and its native
dependencies as extension wheels would make the extension per-platform for a step that precedes nothing but
the backend anyway). It never starts while Blender's *Allow Online Access* is off. The Hugging Face token goes
into that process's environment alone.
"""

import os

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


NO_BACKEND = ("Install the backend first (Backend Environment › Install Backend, or Use Existing Python): "
              "downloads run in its Python")


def why_not(context) -> str:
    """Why Download cannot start now ('' when it can)."""
    if not environment.online():
        return environment.offline_reason()
    python = preferences.backend_python(context)
    if not python or not os.path.isfile(python):
        return NO_BACKEND
    return ""


class IMAGE_TO_3D_OT_download_model(bpy.types.Operator):
    """Download the model's files into the Hugging Face cache (files already there are used), verified (size and
    sha256), with the backend's Python"""

    bl_idname = "image_to_3d.download_model"
    bl_label = "Download"
    bl_options = {"REGISTER", "INTERNAL"}

    model: StringProperty(name="Model", options={"HIDDEN"})
    run_async: BoolProperty(name="Return at Once", default=False, options={"HIDDEN", "SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        problem = why_not(context)
        if problem:
            cls.poll_message_set(problem)
        return not problem

    def execute(self, context):
        model_id = self.model
        problem = why_not(context)  # poll is not consulted by every caller
        if problem:
            self.report({"ERROR"}, problem)
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
                # huggingface_hub drops a file it did not finish (files already finished stay in the cache);
                # only u2net's plain download keeps its part to resume.
                kept = catalog.partial_bytes(model_id, store)
                environment.OUTCOMES[key] = {
                    "level": "INFO", "message": f"Cancelled; {human_size(kept)} kept" if kept else "Cancelled",
                    "hint": "Download again resumes where it stopped" if kept else
                            "Download again keeps the files already finished and fetches the rest"}
            else:
                error = task.error or {}
                environment.OUTCOMES[key] = {"level": "ERROR", "message": error.get("message") or "Download failed",
                                             "hint": error.get("hint") or task.log_tail(1)}

        args = ["download", "--model", model_id, "--store", store, "--json"]
        task = environment.new_task("download", preferences.backend_python(context), args, prefs, key=key,
                                    expected_total=catalog.download_size(model_id, store), token=True)
        task.grace = 3.0  # Cancel: the download ends on SIGTERM, leaving no temporary file in the cache
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
