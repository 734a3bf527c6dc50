"""Operators, one per file; each module registers its own classes."""

from . import backend_env, bake, cancel, downloads, free_memory, generate, image, retopologize

MODULES = (image, generate, bake, retopologize, cancel, free_memory, downloads, backend_env)


def register():
    for module in MODULES:
        module.register()


def unregister():
    for module in reversed(MODULES):
        module.unregister()
