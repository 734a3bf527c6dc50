"""The contract between Blender and the backend: every word that crosses the wire, defined once.

Blender (through ``client/``), the worker, the batch and the server all take these names from here and from
nowhere else. Standard library only, and no import from the rest of the backend: both sides can import it.

The wire: requests are JSON objects (a line on the worker's stdin, or the body of ``POST /generate`` on a
server); events are JSON objects, one per line (the worker's protocol stream, or the server's streamed answer).
"""

import re

# Requests: {"op": ..., "id": ..., "image": ..., "output_dir": ..., "options": {...}} (+ "mesh" for a bake).
OP_GENERATE, OP_BAKE, OP_CANCEL, OP_SHUTDOWN, OP_PING = "generate", "bake", "cancel", "shutdown", "ping"
JOB_OPS = (OP_GENERATE, OP_BAKE)

# Events: {"event": ..., "id": ...} plus, per kind: ready (versions, device, memory), progress (stage, fraction,
# message), result (path, stats, views), error (code, message, hint), log (level, message).
READY, PROGRESS, RESULT, ERROR_EVENT, LOG = "ready", "progress", "result", "error", "log"
CANCELLED_CODE = "cancelled"  # the error code of a job that stopped on a cancel

# A job's states, as a client keeps them.
QUEUED, RUNNING, DONE, ERROR, CANCELLED = "queued", "running", "done", "error", "cancelled"
FINAL_STATES = (DONE, ERROR, CANCELLED)

# A job's result files, written into its folder (by the worker, or by the client from a server's answer).
RESULT_FILES = {OP_GENERATE: "mesh.npz", OP_BAKE: "bake.npz"}
VIEWS_FILE = "views.png"  # a multi-view model's generated views, kept next to the mesh

# A cached field's id (stats["field_id"] of a result; options.field_id of a bake): a name, never a path.
FIELD_ID = re.compile(r"[0-9a-f]{32}\Z")  # with .match: \Z, since $ would also take a trailing newline

# Options that name the machine's own files or devices: a client keeps them; a server uses its own.
LOCAL_OPTIONS = ("weights", "u2net_path", "device")

# The shared server (cluster-serve): the same events, streamed over HTTP.
GENERATE_PATH, HEALTH_PATH = "/generate", "/health"
SERVICE = "image_to_3d"  # what /health (and a 401) calls itself, so that Check knows it reached this server
TOKEN_ENV = "IMAGE_TO_3D_SERVER_TOKEN"  # the server's token, for the server and for a client's health command
AUTHORIZATION, BEARER = "Authorization", "Bearer "
EVENTS_TYPE = "application/x-ndjson"  # the streamed answer: one event per line


class Stage:
    """Stage names of the one pipeline, as they appear in progress events, the --json summary and the panel."""

    LOAD = "loading_model"
    BACKGROUND = "removing_background"
    VIEWS = "generating_views"
    SHAPE = "generating_shape"  # a native 3D model's diffusion steps (TripoSG)
    ENCODE = "encoding"
    TRIPLANE = "building_triplanes"
    FIELD = "recomputing_field"  # a cached field is gone: the image is encoded again (the usual stages follow)
    SURFACE = "extracting_surface"
    COLOR = "colouring"
    REDUCE = "reducing"  # also the quad remeshing
    UNWRAP = "unwrapping"
    BAKE = "baking_texture"
    PAINT = "painting"  # colours from the pictures the model saw (--colours images)
    QUEUED = "waiting_in_queue"  # a shared server whose GPUs are all busy: the message says the place

    ALL = (BACKGROUND, LOAD, VIEWS, SHAPE, ENCODE, TRIPLANE, FIELD, SURFACE, COLOR, REDUCE, UNWRAP, BAKE, PAINT,
           QUEUED)
