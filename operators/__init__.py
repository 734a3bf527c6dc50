"""Operators, one per file, each registering its own classes (``CLASSES`` and Blender's classes factory); and
what they share: ``jobs`` (the job engine: submit, tick, finish, the batch queue), ``results`` (a job's input
and result as Blender data) and ``job_options`` (a request's options).

May import the root modules (preferences, properties, environment, import_mesh), ``backend.client``,
``backend.protocol`` and ``backend.options``; never a panel.
"""

from . import backend_env, bake, cancel, downloads, free_memory, generate, image, jobs, retopologize

MODULES = (image, generate, bake, retopologize, cancel, free_memory, downloads, backend_env)


def register():
    for module in MODULES:
        module.register()


def unregister():
    jobs.unregister()  # stop following every job before the operators go
    for module in reversed(MODULES):
        module.unregister()
