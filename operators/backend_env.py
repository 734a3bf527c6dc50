"""The backend environment from the preferences: Check, Install Backend, Use Existing Python, Cancel.

Each runs ``python -m backend ...`` as a background task (``environment.TASKS``) followed by a timer; in
background mode (scripts, tests) the operator waits for it instead. With the Remote backend, Check asks the
shared server's ``/health`` instead, from a process of Blender's own Python (stdlib only: backend/client.py).
"""

import os

import bpy
from bpy.props import BoolProperty, StringProperty

from .. import environment, preferences
from ..backend.client import EXTENSION_ROOT, default_env
from ..backend.client.commands import Task
from ..backend.protocol import TOKEN_ENV

REMOTE_CHECK_TIMEOUT_S = 30.0

ASYNC = BoolProperty(name="Return at Once", default=False, options={"HIDDEN", "SKIP_SAVE"},
                     description="In background mode, return while the task runs (the caller drives the timer)")


def blocking(op) -> bool:
    return bpy.app.background and not op.run_async


def start_check(python: str, prefs, key: str = "check", on_done=None, block: bool = False):
    """Run ``python -m backend check``; its summary lands in environment.CHECKS[python]."""
    def done(task):
        summary = environment.record_check(python, task)
        if on_done is not None:
            on_done(task, summary)

    task = environment.new_task("check", python, ["check"], prefs, key=key, timeout=environment.CHECK_TIMEOUT_S,
                                document=True)
    return environment.start(key, task, done, block=block)


def start_remote_check(prefs, block: bool = False):
    """Ask the shared server at the Server URL what it offers (and whether it takes the token); the summary lands in
    environment.CHECKS (preferences.remote_check)."""
    url = prefs.server_url.strip()
    env = default_env(EXTENSION_ROOT)
    env.pop(TOKEN_ENV, None)
    if prefs.server_token.strip():
        env[TOKEN_ENV] = prefs.server_token.strip()  # in the environment, never on a command line
    task = Task("check", [environment.blender_python(), "-m", "backend.client", "health", url],
                cwd=str(EXTENSION_ROOT), env=env, timeout=REMOTE_CHECK_TIMEOUT_S, key="check")
    return environment.start("check", task, lambda done: preferences.record_remote_check(url, done), block=block)


class IMAGE_TO_3D_OT_check_backend(bpy.types.Operator):
    """Ask the backend what it has: the backend Python's torch, device, GPU memory and missing packages; or the \
shared server's models, GPUs and queue"""

    bl_idname = "image_to_3d.check_backend"
    bl_label = "Check"
    bl_options = {"REGISTER", "INTERNAL"}

    run_async: ASYNC

    @classmethod
    def poll(cls, context):
        python = preferences.backend_python(context)
        if environment.running("check") or environment.running("use_existing"):
            cls.poll_message_set("A check is running")
            return False
        if preferences.uses_remote(context):
            problem = preferences.remote_problem(preferences.get(context))
            if problem:
                cls.poll_message_set(problem)
            return not problem
        if not python or not os.path.isfile(python):
            cls.poll_message_set("Set the backend Python first (or click Install Backend)")
            return False
        return True

    def execute(self, context):
        if preferences.uses_remote(context):
            prefs = preferences.get(context)
            task = start_remote_check(prefs, block=blocking(self))
            if task.finished:
                summary = preferences.remote_check(prefs.server_url)
                self.report({"INFO"} if summary["level"] != "ERROR" else {"WARNING"},
                            " ".join([summary["line"], *summary["todo"]]))
            return {"FINISHED"}
        python = preferences.backend_python(context)
        task = start_check(python, preferences.get(context), block=blocking(self))
        if task.finished:
            summary = environment.check_of(python)
            self.report({"INFO"} if summary["level"] != "ERROR" else {"WARNING"}, summary["line"])
        return {"FINISHED"}


class IMAGE_TO_3D_OT_use_existing_python(bpy.types.Operator):
    """Use a Python interpreter you already have (with torch): it is checked first, and what it lacks is listed"""

    bl_idname = "image_to_3d.use_existing_python"
    bl_label = "Use Existing Python…"
    bl_options = {"REGISTER", "INTERNAL"}

    filepath: StringProperty(name="Python", subtype="FILE_PATH", options={"SKIP_SAVE"})
    run_async: ASYNC

    @classmethod
    def poll(cls, context):
        if environment.running("use_existing") or environment.running("install"):
            cls.poll_message_set("Wait for the running check or install to finish")
            return False
        return True

    def invoke(self, context, event):
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context):
        python = os.path.abspath(bpy.path.abspath(self.filepath)) if self.filepath else ""
        if not python or not os.path.isfile(python):
            self.report({"ERROR"}, f"Not a file: {python or '(none)'}")
            return {"CANCELLED"}
        prefs = preferences.get(context)

        def done(task, summary):
            ok = summary["report"] is not None and not summary["report"].get("missing")
            if ok:
                prefs.backend_python = python
                environment.OUTCOMES["use_existing"] = {"level": "INFO", "message": f"Using {python}",
                                                        "hint": summary["line"]}
            else:
                environment.OUTCOMES["use_existing"] = {
                    "level": "ERROR", "message": f"{python} cannot run the backend: {summary['line']}",
                    "hint": " ".join(summary["todo"])}

        task = start_check(python, prefs, key="use_existing", on_done=done, block=blocking(self))
        if task.finished:
            outcome = environment.OUTCOMES["use_existing"]
            if outcome["level"] == "ERROR":
                self.report({"ERROR"}, outcome["message"])
                return {"CANCELLED"}
            self.report({"INFO"}, outcome["message"])
        return {"FINISHED"}


def wheelhouse(prefs) -> str:
    """The Wheelhouse Folder, absolute ('' when none is set)."""
    folder = prefs.wheels_dir.strip() if prefs else ""
    return os.path.abspath(bpy.path.abspath(folder)) if folder else ""


def install_args(prefs) -> list:
    args = ["install", "--target", environment.backend_env_dir(), "--json", "--flavor", prefs.torch_build]
    if wheelhouse(prefs):
        return args + ["--wheels", wheelhouse(prefs)]  # everything from there: no index, no network
    if prefs.package_index_url.strip():
        args += ["--index-url", prefs.package_index_url.strip()]
    if prefs.torch_index_url.strip():
        args += ["--torch-index-url", prefs.torch_index_url.strip()]
    return args


class IMAGE_TO_3D_OT_install_backend(bpy.types.Operator):
    """Create the backend environment in the extension's user folder with Blender's own Python: PyTorch for this
    machine, then the backend's requirements (downloads several GB for CUDA)"""

    bl_idname = "image_to_3d.install_backend"
    bl_label = "Install Backend"
    bl_options = {"REGISTER", "INTERNAL"}

    run_async: ASYNC

    @classmethod
    def poll(cls, context):
        if environment.running("install"):
            cls.poll_message_set("The backend is being installed")
            return False
        if not environment.online() and not wheelhouse(preferences.get(context)):
            cls.poll_message_set(environment.offline_reason().replace("downloads are", "installing is") +
                                 " (a Wheelhouse Folder installs with no network)")
            return False
        return True

    def execute(self, context):
        prefs = preferences.get(context)
        log_path = environment.backend_env_dir() / "install.log"

        def done(task):
            if task.state == "done" and task.result and task.result.get("python"):
                prefs.backend_python = task.result["python"]
                environment.OUTCOMES["install"] = {"level": "INFO", "message": "Backend installed: "
                                                   f"{task.result['python']}", "hint": ""}
                start_check(task.result["python"], prefs, block=bpy.app.background)
            elif task.state == "cancelled":
                environment.OUTCOMES["install"] = {
                    "level": "INFO", "message": "Install cancelled",
                    "hint": "Install Backend again continues with what is already installed"}
            else:
                error = task.error or {}
                hint = error.get("hint") or ""
                if str(log_path) not in hint:
                    hint = f"{hint} The log is {log_path}.".strip()
                environment.OUTCOMES["install"] = {"level": "ERROR",
                                                   "message": error.get("message") or "Install failed",
                                                   "hint": hint}

        task = environment.new_task("install", environment.blender_python(), install_args(prefs), prefs,
                                    key="install")
        environment.start("install", task, done, block=blocking(self))
        if task.finished:
            outcome = environment.OUTCOMES["install"]
            self.report({"ERROR"} if outcome["level"] == "ERROR" else {"INFO"}, outcome["message"])
            return {"CANCELLED"} if outcome["level"] == "ERROR" else {"FINISHED"}
        return {"FINISHED"}


class IMAGE_TO_3D_OT_cancel_task(bpy.types.Operator):
    """Stop it (a download keeps what it fetched: Download again resumes)"""

    bl_idname = "image_to_3d.cancel_task"
    bl_label = "Cancel"
    bl_options = {"REGISTER", "INTERNAL"}

    key: StringProperty(options={"HIDDEN"})

    @classmethod
    def poll(cls, context):
        if not any(not t.finished for t in environment.TASKS.values()):
            cls.poll_message_set("Nothing is running")
            return False
        return True

    def execute(self, context):
        if not environment.cancel(self.key):
            return {"CANCELLED"}
        if bpy.app.background:
            environment.finish(self.key)
        return {"FINISHED"}


CLASSES = (IMAGE_TO_3D_OT_check_backend, IMAGE_TO_3D_OT_use_existing_python, IMAGE_TO_3D_OT_install_backend,
           IMAGE_TO_3D_OT_cancel_task)

register, _unregister_classes = bpy.utils.register_classes_factory(CLASSES)


def unregister():
    environment.stop_all()  # no install or check left running without its operator
    _unregister_classes()
