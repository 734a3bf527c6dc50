"""Image to 3D: a reference image in, a coloured mesh out, with reconstruction models run locally.

Blender side: stdlib + numpy + bpy only. The models run in a separate process (``backend/``, started
with the backend Python from the preferences); README.md, "Layout" and "The wire", says how the two meet.

The sub-modules are imported in ``register()``, not here: the repository root is also the root of the
test tree, and importing this package must not need bpy.
"""


def _modules():
    from . import operators, panels, preferences, properties

    return (preferences, properties, operators, panels)


def register():
    for module in _modules():
        module.register()


def unregister():
    from .backend.client import session

    session.stop()  # never leave a worker behind
    for module in reversed(_modules()):
        module.unregister()
