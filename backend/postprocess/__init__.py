"""Post-processing after surface extraction: reduce (or quads) -> UV atlas -> texture baked from the field.

Every model family goes through :func:`run`; Bake from Model goes through :func:`bake_polygons`. Colours
always come from the model's field, never from the old vertices.
"""

from __future__ import annotations

import numpy as np

from ..colour import GREY
from ..protocol import Stage
from ..errors import InputError
from ..mesh import Mesh

DEFAULT_TEXTURE_FACES = 50_000  # a texture without a face budget: light enough for a game engine


def colour_or_grey(colour_field, model_id: str, notes: list):
    """The model's colour field, or, for a model that makes no colour (``colour_field`` None: TripoSG), one that
    paints every point neutral grey (never black), with a note saying so."""
    if colour_field is not None:
        return colour_field
    from ..models import registry

    notes.append(f"{registry.get(model_id).display_name} makes no colour: painted grey "
                 "(Colours: From Images, --colours images, paints it from the picture)")
    return lambda points, on_fraction=None: np.full((len(np.asarray(points).reshape(-1, 3)), 3), GREY, np.float32)


def _colour_sources(painting, colour_field, model_id: str):
    """-> (the painting, None when no view paints; the colour field, grey for a model with none when nothing
    paints; the notes so far)."""
    notes: list[str] = list(painting.notes) if painting is not None else []
    painting = painting if painting is not None and painting.views else None
    if painting is None:
        colour_field = colour_or_grey(colour_field, model_id, notes)
    return painting, colour_field, notes


def run(mesh: Mesh, colour_field, options, stages, painting=None) -> Mesh:
    """--faces / --quads / --texture on an extracted mesh. ``stats`` gains ``faces_reached`` and ``notes``: what
    was done in place of what was asked, in words for the summary and the panel. ``painting``
    (colours.Painting, ``--colours images``) paints the vertex colours and the texture from the pictures."""
    painting, colour_field, notes = _colour_sources(painting, colour_field, options.model)
    target = None if options.faces is None else int(options.faces)
    if options.texture and target is None:
        target = DEFAULT_TEXTURE_FACES
        notes.append(f"reduced to about {target:,} faces for the texture (a face budget chooses another count)")
    vertices, faces, colors = mesh.vertices, mesh.faces, mesh.colors
    quads = False
    if target is not None and options.quads:
        from .quads import QuadsFailed, quad_remesh

        stages.begin(Stage.REDUCE, f"quad remeshing to about {target:,} faces")
        try:
            vertices, faces = quad_remesh(vertices, faces, target, stages.check)
            quads = True
        except QuadsFailed as e:
            notes.append(f"quad remeshing failed ({e}): reduced to triangles instead")
    if target is not None and not quads:
        if target >= len(faces):
            notes.append(f"the surface has {len(faces):,} faces, within the budget of {target:,}: left as extracted")
        else:
            from .reduce import reduce

            stages.begin(Stage.REDUCE, f"{len(faces):,} -> {target:,} faces")
            vertices, faces = reduce(vertices, faces, target, stages.check)
    if vertices is not mesh.vertices:
        stages.update(0.9, "colouring the new vertices from the field")
        colors = colour_field(vertices) if colour_field is not None else None
    if painting is not None:
        # No field (a geometry-only model): its vertex colours are a placeholder, the painting spreads its own.
        colors = painting.vertices(vertices, faces, colors if colour_field is not None else None, stages)
    uvs = texture = None
    if options.texture:
        faces, uvs, texture, split = texture_for(vertices, faces, colour_field, int(options.texture), stages,
                                                 painting)
        if split:
            notes.append(f"{split:,} quads that the UV atlas cut in two were split into triangles")
    out = Mesh(vertices, faces, colors, stats=dict(mesh.stats), uvs=uvs, texture=texture)
    out.stats.update(faces_reached=int(len(out.faces)), notes=notes, quads=quads,
                     texture=int(options.texture) if options.texture else None)
    if target is not None:
        out.stats["face_budget"] = target
    if painting is not None:
        out.stats.update(painting.stats)
    return out


def texture_for(vertices, faces, colour_field, size: int, stages, painting=None):
    """-> (faces, uvs (M, K, 2) per corner, texture (size, size, 3) uint8, quads split into triangles)."""
    from ..mesh import triangulate
    from .atlas import unwrap_faces

    stages.begin(Stage.UNWRAP, f"UV atlas for {len(faces):,} faces")
    faces, uvs, _, split = unwrap_faces(vertices, faces, size, stages.check)
    tris, tri_uvs = triangulate(faces, uvs)
    return faces, uvs, _bake(vertices, tris, tri_uvs, size, colour_field, stages, painting), split


def bake_polygons(vertices, corner_verts, loop_totals, uvs, colour_field, size: int, stages, painting=None,
                  model: str = ""):
    """Bake from Model on any polygon mesh: -> (uvs (L, 2) per loop, texture, stats). Without ``uvs`` an
    atlas is made. ``model``: the model's id (named in the note when it makes no colour)."""
    painting, colour_field, notes = _colour_sources(painting, colour_field, model)
    from ..mesh_input import check_polygons
    from .atlas import fan, unwrap

    vertices = np.asarray(vertices, np.float32).reshape(-1, 3)
    corner_verts = np.asarray(corner_verts, np.int64).reshape(-1)
    loop_totals = np.asarray(loop_totals, np.int64).reshape(-1)
    check_polygons(vertices, corner_verts, loop_totals, None if uvs is None else np.asarray(uvs).reshape(-1, 2))
    stats = {"polygons": int(len(loop_totals)), "uvs": "given" if uvs is not None else "made"}
    if notes:
        stats["notes"] = notes
    if uvs is None:
        stages.begin(Stage.UNWRAP, f"UV atlas for {len(loop_totals):,} polygons")
        uvs, stats["polygons_apart"], broken, _ = unwrap(vertices, corner_verts, loop_totals, size, stages.check)
        if broken.any():  # the artist's polygons are theirs: no splitting here
            raise InputError(f"the UV atlas cuts {int(broken.sum()):,} of the object's polygons in two",
                             hint="Unwrap the object in Blender (UV › Unwrap or Smart UV Project), then Bake from "
                                  "Model again: the texture is baked on your UV map.")
    uvs = np.asarray(uvs, np.float32).reshape(len(corner_verts), 2)
    tri_loops, _ = fan(loop_totals, vertices[corner_verts])  # the triangles the atlas was made on
    texture = _bake(vertices, corner_verts[tri_loops], uvs[tri_loops], size, colour_field, stages, painting)
    if painting is not None:
        stats.update(painting.stats)
    return uvs, texture, stats


def _bake(vertices, tris, tri_uvs, size: int, colour_field, stages, painting=None) -> np.ndarray:
    from . import bake

    if painting is not None:
        return painting.texture(vertices, tris, tris, tri_uvs, size, colour_field, stages)

    stages.begin(Stage.BAKE, f"{size}² texture from the field")
    texture, _ = bake.bake(vertices, tris, tri_uvs, size, colour_field, on_fraction=stages.update)
    return texture
