"""What Blender imports of the backend: standard library and numpy only, never torch or bpy.

- ``jobs``: a job as a client sees it, and the line reader both transports share;
- ``pipe``: the local worker (``python -m backend serve``), JSON lines over pipes;
- ``remote``: a shared server (``python -m backend cluster-serve``) over HTTP, and its health;
- ``commands``: one-shot backend commands (check, install, download) with progress and cancel;
- ``session``: the one backend of a Blender session and its job in flight;
- ``catalog``: the models, their files, licences and defaults, as the preferences and the panel show them;
- ``mesh_arrays``, ``png``: a result's arrays as Blender wants them, and PNG files from pixel buffers.

May import: ``protocol``, ``options``, ``errors``, ``colour``, ``files``, ``hub``, ``licences``, ``models.registry`` (all
import-light). The engine (pipeline, models, surface, post-processing, worker, server) never imports this package.
"""

from .jobs import Job
from .pipe import EXTENSION_ROOT, Worker, default_env
from .remote import RemoteError, RemoteWorker, health, health_summary, server_url

__all__ = ["EXTENSION_ROOT", "Job", "RemoteError", "RemoteWorker", "Worker", "default_env", "health",
           "health_summary", "server_url"]
