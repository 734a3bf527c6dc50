"""Where the post-processing's colours come from when ``--colours images``: the views (sources.py) painted onto
each mesh the post-processing makes (paint.py), over the field, or over colours spread on the surface when the
model has no field. With ``--colours field`` none of this runs and every output is as before.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..protocol import Stage


class Painting:
    """The views of one generation; :meth:`vertices` and :meth:`texture` paint a mesh in the views' frame and
    record, per surface, which source coloured what share of it (``stats``)."""

    def __init__(self, views: list, about: list, notes: list):
        self.views, self.about, self.notes = views, about, notes
        self.shares: dict = {}
        self._painters: dict = {}

    def painter(self, vertices, faces):
        from .paint import Painter

        key = id(vertices)  # the faces may be re-cut (the atlas splits quads), the surface is the same
        if key not in self._painters:
            self._painters = {key: (vertices, Painter(vertices, faces, self.views))}  # one mesh at a time
        return self._painters[key][1]

    def vertices(self, vertices, faces, fallback: Optional[np.ndarray], stages) -> np.ndarray:
        """Vertex colours (V, 3) in [0, 1], painted over ``fallback`` (the field's colours; None: spread)."""
        stages.begin(Stage.PAINT, f"painting {len(vertices):,} vertices from {len(self.views)} view(s)")
        colours, self.shares["vertices"] = self.painter(vertices, faces).paint_vertices(fallback)
        stages.check()
        return colours

    def texture(self, vertices, faces, tris, tri_uvs, size: int, colour_field, stages) -> np.ndarray:
        from .paint import paint_texture

        stages.begin(Stage.PAINT, f"painting a {size}² texture from {len(self.views)} view(s)")
        texture, _, self.shares["texture"] = paint_texture(self.painter(vertices, faces), tris, tri_uvs, size,
                                                           colour_field, on_fraction=stages.update)
        return texture

    @property
    def stats(self) -> dict:
        return {"colours": "images", "colour_sources": dict(self.shares), "views": list(self.about)}


def painting_for(model, picture, grid, vertices, faces, stages) -> Painting:
    """The views of a generation, fitted to its mesh. ``model.conditioning_camera`` names the camera the model
    conditions on; a model without one has its picture's camera fitted to the mesh's silhouette."""
    from .sources import views_for

    kind = getattr(model, "conditioning_camera", None)
    stages.begin(Stage.PAINT, "placing the pictures" if kind else "fitting the picture's camera to the mesh")
    views, about, notes = views_for(kind, picture, grid, vertices, faces, stages.check)
    if not views:
        notes.append("no picture to paint from: the colours are the model's")
    return Painting(views, about, notes)
