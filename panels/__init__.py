"""Panels: what the artist sees in the 3D viewport's sidebar; each module registers its own classes.

May import the operators, the root modules, ``backend.client`` and ``backend.protocol``; nothing imports a panel.
The add-on preferences stay a root module (``preferences.py``): the operators read their values (the backend
Python, the server, the model folder), and the operators never import a panel.
"""

from . import sidebar

MODULES = (sidebar,)


def register():
    for module in MODULES:
        module.register()


def unregister():
    for module in reversed(MODULES):
        module.unregister()
