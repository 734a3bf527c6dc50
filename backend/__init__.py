"""Image to 3D backend: image -> mesh with local reconstruction models.

Import-light on purpose: Blender imports this package (for ``client``) without torch installed.
Heavy modules (torch, rembg) are imported only by the modules that need them.
"""

__version__ = "0.1.0"
