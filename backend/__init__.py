"""Image to 3D backend: image -> mesh with local reconstruction models. Never imports bpy.

Import-light on purpose: Blender imports this package (for ``client/``, ``protocol`` and ``options``) without
torch installed. Heavy modules (torch, rembg) are imported only by the modules that need them.

- ``protocol`` (the wire's words) and ``options`` (every option and its one check): both sides import them;
- ``client/``: what Blender imports (stdlib + numpy); the engine below never imports it;
- the engine: ``pipeline`` over ``preprocess``, ``models/``, ``surface``, ``field``, ``postprocess/``, ``mesh``;
- entry points over the one pipeline: ``cli``, ``worker`` (``serve``), ``batch``/``ray_batch``, ``server/``.
"""

__version__ = "0.1.0"
