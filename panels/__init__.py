"""Panels; each module registers its own classes."""

from . import sidebar

MODULES = (sidebar,)


def register():
    for module in MODULES:
        module.register()


def unregister():
    for module in reversed(MODULES):
        module.unregister()
