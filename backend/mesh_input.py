"""The one check of every mesh that enters the backend: Bake from Model's .npz, written by Blender or uploaded
to the server (the server hands the worker's job code the same file).

A file is refused (:class:`~.errors.InputError`, ``bad_input``, a message naming what is wrong) when:
- a member's .npy header declares a dtype, shape or count outside the budget: read from the header alone,
  before a byte of data is allocated (a deflated member may declare gigabytes in a few bytes of header);
- a coordinate is not finite, or beyond :data:`MAX_COORDINATE`;
- a loop names a vertex that does not exist, a polygon has fewer than 3 corners, or the loops do not add up.

Retopologize sends no mesh (it extracts the surface again from the field), so it needs no check here.
"""

from __future__ import annotations

import zipfile

import numpy as np

from .errors import InputError
from .options import MAX_FACES

# As many polygons as the largest face budget, 4 loops each (a quad mesh at that count), and no more vertices
# than loops (a vertex no loop names is never baked).
MAX_POLYGONS = MAX_FACES
MAX_LOOPS = 4 * MAX_POLYGONS
MAX_VERTICES = MAX_LOOPS
# The models' meshes fill a box of about +-1 (the bake request's mesh is in that frame, the object's placement
# undone). 1e4 is four orders of magnitude of editing beyond it, where float32 still resolves 1e-3: the field
# is only meaningful inside the box, and squares and sums of such coordinates (areas, the texel density) stay
# far from float32's overflow at 3e38, where 1e38 or inf make the density 0 or NaN and xatlas never returns.
MAX_COORDINATE = 1e4

_HINT = "Bake from Model sends the active object's mesh; check it in Blender (Mesh › Clean Up) and bake again."
_FLOAT, _INTEGER = "floating-point numbers", "integers"
# name: (what it holds, dtype kinds, trailing shape, what its length counts, the most of them)
_ARRAYS = {
    "vertices": (_FLOAT, "f", (3,), "vertices", MAX_VERTICES),
    "corner_verts": (_INTEGER, "iu", (), "loops", MAX_LOOPS),
    "loop_totals": (_INTEGER, "iu", (), "polygons", MAX_POLYGONS),
    "uvs": (_FLOAT, "f", (2,), "loops", MAX_LOOPS),
}
_REQUIRED = ("vertices", "corner_verts", "loop_totals")


def load_bake_mesh(path) -> dict:
    """A bake request's .npz -> {vertices (N, 3), corner_verts (L,), loop_totals (M,), uvs (L, 2) or None},
    in the dtypes written, every check passed; else :class:`InputError`."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = {name[:-4]: name for name in archive.namelist() if name.endswith(".npy")}
            for name in _REQUIRED:
                if name not in members:
                    raise InputError(f"the mesh file has no {name}", hint=_HINT)
            headers = {name: _header(archive, members[name], name) for name in _ARRAYS if name in members}
            arrays = {name: _read(archive, members[name], name, *headers[name]) for name in headers}
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        raise InputError(f"the mesh to bake on could not be read: {e}", hint=_HINT) from None
    arrays.setdefault("uvs", None)
    check_polygons(**arrays)
    return arrays


def _header(archive: zipfile.ZipFile, member: str, name: str):
    """(shape, fortran order, dtype) from the member's .npy header, checked against the budget."""
    what, kinds, trailing, counted, most = _ARRAYS[name]
    with archive.open(member) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # 3.0 only exists for structured dtypes with non-Latin-1 field names: never a mesh array
                raise ValueError(f"version {version}")
        except ValueError as e:
            raise InputError(f"{name} is not a NumPy array the bake can read ({e})", hint=_HINT) from None
    if dtype.kind not in kinds or dtype.itemsize > 8 or dtype.fields is not None or dtype.subdtype is not None:
        raise InputError(f"{name} must hold {what}, not {dtype}", hint=_HINT)
    expected = "(N, 3)" if trailing == (3,) else "(L, 2)" if trailing == (2,) else "(N,)"
    if len(shape) != 1 + len(trailing) or tuple(shape[1:]) != trailing:
        raise InputError(f"{name} must be an array of shape {expected}, not {tuple(shape)}", hint=_HINT)
    if shape[0] > most:
        raise InputError(f"the mesh declares {shape[0]:,} {counted}, more than the {most:,} {counted} a bake "
                         f"takes", hint="Bake on a lighter mesh (Decimate it first).")
    return tuple(shape), fortran, dtype


def _read(archive: zipfile.ZipFile, member: str, name: str, shape, fortran: bool, dtype) -> np.ndarray:
    """The member's data, exactly as much as its (checked) header declares."""
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
        out = np.empty(shape, dtype, order="F" if fortran else "C")
        view = out.reshape(-1, order="A").view(np.uint8)
        got = f.readinto(view) if view.size else 0
        while 0 < got < view.size:
            more = f.readinto(view[got:])
            if not more:
                break
            got += more
    if got != view.size:
        raise InputError(f"{name} is cut short: {got:,} of its {view.size:,} bytes are there", hint=_HINT)
    return out


def check_polygons(vertices, corner_verts, loop_totals, uvs=None) -> None:
    """Values and index ranges of a polygon mesh as Blender holds it (arrays already of their shapes)."""
    if not len(loop_totals):
        raise InputError("the mesh has no polygons to bake on", hint=_HINT)
    bad = int(np.count_nonzero(~np.isfinite(vertices)))
    if bad:
        raise InputError(f"{_not_finite(bad, 'vertex coordinate')} (inf or NaN)", hint=_HINT)
    reach = float(np.abs(vertices).max(initial=0.0))
    if reach > MAX_COORDINATE:
        raise InputError(f"vertex coordinates reach {reach:,.6g}, beyond the {MAX_COORDINATE:,.0f} the bake takes "
                         "(the models' box is about 1 across)",
                         hint="Bake from Model works on the object as Image to 3D placed it: undo the edit that "
                              "sent vertices so far, or Generate 3D again.")
    smallest = int(loop_totals.min())
    if smallest < 3:
        raise InputError(f"every polygon needs 3 corners or more; one has {smallest}", hint=_HINT)
    # Each total is at most the loop count before they are added up, so the sum cannot wrap around.
    largest = int(loop_totals.max())
    total = int(loop_totals.sum(dtype=np.int64)) if largest <= len(corner_verts) else None
    if total != len(corner_verts):
        said = f"{total:,}" if total is not None else "more"
        raise InputError(f"the polygons have {said} loops in all, but corner_verts has {len(corner_verts):,}",
                         hint=_HINT)
    for index in (int(corner_verts.min()), int(corner_verts.max())):
        if not 0 <= index < len(vertices):
            raise InputError(f"a loop names vertex {index}, which does not exist (the mesh has {len(vertices):,} "
                             "vertices)", hint=_HINT)
    if uvs is not None:
        if uvs.shape != (len(corner_verts), 2):
            raise InputError(f"uvs must be an array of shape ({len(corner_verts)}, 2), not {tuple(uvs.shape)}",
                             hint=_HINT)
        bad = int(np.count_nonzero(~np.isfinite(uvs)))
        if bad:
            raise InputError(f"{_not_finite(bad, 'UV coordinate')} (inf or NaN)",
                             hint="Check the object's UV map in the UV Editor, or remove it to let Bake from Model "
                                  "make one.")


def _not_finite(count: int, what: str) -> str:
    return f"1 {what} is not a finite number" if count == 1 else f"{count:,} {what}s are not finite numbers"
