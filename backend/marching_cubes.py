"""Marching cubes in torch, on the device the grid lives on: the same vertices, triangles (in the same order)
and winding as PyMCubes 0.1.6, which the references use, so meshes stay what they were.

The convention is PyMCubes': a grid point is *inside* where ``value <= 0``, corners and edges are numbered as
in the classic Lorensen-Cline case table (below), triangles come cell by cell in x-major order, and each edge's
vertex is interpolated from the end PyMCubes starts at (it matters in the last bit). A grid block anywhere in a
larger grid gives the vertices the whole grid would (``offset``), so blocks can be triangulated one at a time.
Wheels-free: nothing is compiled, so the backend installs on every Python Blender ships.
"""

from __future__ import annotations

import torch

# Corner m of a cell at (x, y, z) + CORNERS[m]; edge e joins corners EDGE_CORNERS[e].
CORNERS = ((0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (1, 1, 1), (0, 1, 1))
EDGE_CORNERS = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7))

# The triangles of each of the 256 cases (bit m set: corner m inside), as edge numbers in hex, three per
# triangle: the public-domain table of Lorensen & Cline as published by Paul Bourke, which PyMCubes uses.
# It was read back from PyMCubes (one cell per case) and tests/test_marching_cubes.py checks it against it.
_CASES = (
    ";083;019;183981;12a;08312a;92a029;2832a8a98;"
    "3b2;0b28b0;19023b;1b219b98b;3a1ba3;0a108a8ba;3903b9ba9;98aa8b;"
    "478;430734;019847;419471731;12a847;34730412a;92a902847;2a9297273794;"
    "8473b2;b47b24204;90184723b;47b94b9b2921;3a13ba784;1ba14b1047b4;47890b9bab03;47b4b99ba;"
    "954;954083;054150;854835315;12a954;30812a495;52a542402;2a5325354348;"
    "95423b;0b208b495;05401523b;21525828b485;a3ba13954;4950818a18ba;54050b5bab03;54858aa8b;"
    "978579;930953573;078017157;153357;978957a12;a12950530573;802825857a52;2a5253357;"
    "7957893b2;95797292027b;23b018178157;b21b17715;958857a13a3b;5705097b010aba0;ba0b03a50807570;ba57b5;"
    "a65;0835a6;9015a6;1831985a6;165261;165126308;965906026;598582526328;"
    "23ba65;b08b20a65;01923b5a6;5a61929b298b;63b653513;08b0b50515b6;3b6036065059;65969bb98;"
    "5a6478;43047365a;1905a6847;a65197173794;612651478;125526304347;847905065026;739794329596269;"
    "3b2784a65;5a647242027b;01947823b5a6;9219b294b7b45a6;8473b53515b6;51b5b610b7b404b;059065036b63847;65969b4797b9;"
    "a4964a;4a649a083;a01a60640;83181686461a;149124264;308129249264;024426;832824426;"
    "a49a64b23;08228b49a4a6;3b201606461a;64161a48121b8b1;964936913b63;8b1810b61914641;3b6360064;648b68;"
    "7a678a89a;0730a709a67a;a671a7178180;a67a71173;126168189867;269291679093739;780706602;732672;"
    "23ba68a89867;20727b09767a9a7;1801781a767a23b;b21b17a61671;896867916b63136;091b67;7807063b0b60;7b6;"
    "76b;308b76;019b76;819831b76;a126b7;12a3086b7;2902a96b7;6b72a3a83a98;"
    "723627;708760620;276237019;162186198876;a76a17137;a7617a187108;03707a0a96a7;76a7a88a9;"
    "684b86;36b306046;86b846901;946963931b36;6846b82a1;12a30b06b046;4b846b0292a9;a93a32943b36463;"
    "823842462;042462;190234246438;194142246;8138618466a1;a10a06604;4634386a3039a93;a946a4;"
    "49576b;083495b76;50154076b;b76834354315;954a1276b;6b712a083495;76b54a42a402;348354325a52b76;"
    "723762549;954086062687;362376150540;628687218485158;954a16176137;16a176107870954;40a4a503a6a737a;76a7a854a48a;"
    "6956b9b89;36b063056095;0b805b01556b;6b3635531;12a95b9b8b56;0b306b09656912a;b85b56805a52025;6b36352a3a53;"
    "589528562382;956960062;158180568382628;156216;13616a386569896;a10a06950560;03856a;a56;"
    "b5a75b;b5ab75830;5b75ab190;a75ab7981831;b12b71751;08312717572b;9759279022b7;75272b592328982;"
    "25a235375;820852875a25;9015a35373a2;982921872a25752;135375;087071175;903935537;987597;"
    "5845a8ab8;5045b05abb30;01984a8aba45;ab4a45b34941314;2512852b8458;04b0b345b2b151b;0250592b5458b85;9452b3;"
    "25a352345384;5a2524420;3a235a385458019;5a2524192942;845853351;045105;845853905035;945;"
    "4b749b9ab;0834979b79ab;1ab1b414074b;3143481a474bab4;4b79b492b912;9749b791b2b1083;b74b42240;b74b42834324;"
    "29a279237749;9a7974a27870207;37a3a274a1a040a;1a2874;491417713;491417081871;403743;487;"
    "9a8ab8;30939bb9a;01a0a88ab;31ab3a;12b1b99b8;30939b1292b9;02b80b;32b;"
    "23828aa89;9a2092;23828a0181a8;1a2;138918;091;038;"
).split(";")
assert len(_CASES) == 256


def _tables():
    counts = torch.tensor([len(c) // 3 for c in _CASES])
    edges = torch.full((256, 15), -1, dtype=torch.int64)
    for case, text in enumerate(_CASES):
        edges[case, :len(text)] = torch.tensor([int(ch, 16) for ch in text], dtype=torch.int64)
    # Each edge as (axis, lower corner): its vertex lies between that corner and corner + unit(axis).
    lower = []
    for a, b in EDGE_CORNERS:
        pa, pb = CORNERS[a], CORNERS[b]
        axis = next(i for i in range(3) if pa[i] != pb[i])
        lower.append((axis, *min(pa, pb)))
    return counts, edges, torch.tensor(lower, dtype=torch.int64)


TRIANGLE_COUNTS, TRIANGLE_EDGES, EDGE_AXIS_CORNER = _tables()
_cache: dict = {}


def _on(device):
    if device not in _cache:
        _cache[device] = tuple(t.to(device) for t in (TRIANGLE_COUNTS, TRIANGLE_EDGES, EDGE_AXIS_CORNER))
    return _cache[device]


def cube_cases(values: torch.Tensor) -> torch.Tensor:
    """The case (0..255) of every cell of (..., X, Y, Z) grids, as int16 (..., X-1, Y-1, Z-1)."""
    inside = (values <= 0).to(torch.int16)
    nx, ny, nz = (n - 1 for n in values.shape[-3:])
    case = torch.zeros((*values.shape[:-3], nx, ny, nz), dtype=torch.int16, device=values.device)
    for m, (dx, dy, dz) in enumerate(CORNERS):
        case |= inside[..., dx:dx + nx, dy:dy + ny, dz:dz + nz] << m
    return case


def marching_cubes(values: torch.Tensor, offset=(0, 0, 0)):
    """Triangulate the surface ``values == 0`` of a (X, Y, Z) float64 grid whose point [0, 0, 0] is grid point
    ``offset`` of the whole grid. Returns vertices (N, 3) float64 in whole-grid units and faces (M, 3) int64,
    each vertex used, one per crossed edge, faces in PyMCubes' order."""
    origin = torch.tensor([offset], dtype=torch.int64, device=values.device)
    vertices, faces, _ = march_blocks(values[None], origin, [o + n for o, n in zip(offset, values.shape)])
    return vertices, faces


def march_blocks(values: torch.Tensor, offsets: torch.Tensor, grid_shape):
    """Marching cubes on B blocks of one grid at once: values (B, X, Y, Z) float64, block b's point [0, 0, 0]
    at grid point offsets[b] (int64). Cells reaching past ``grid_shape`` (the whole grid's point counts) are
    left out, so blocks at the far end may be padded. Returns vertices (N, 3) float64 in grid units (one
    per crossed edge), faces (M, 3) int64 and the grid cell of each face (its linear index, x-major),
    faces ordered by cell and within a cell as PyMCubes orders them. Blocks sharing boundary samples must
    agree on them: an edge on a shared boundary is taken from one of them."""
    device = values.device
    counts, table, edge_axis_corner = _on(device)
    gx, gy, gz = (int(n) for n in grid_shape)
    case = cube_cases(values)
    active = (case != 0) & (case != 255)
    local_max = torch.tensor([gx - 1, gy - 1, gz - 1], device=device) - offsets  # cells per block in the grid
    for axis in range(3):
        shape = [1] * 4
        shape[axis + 1] = -1
        cell_index = torch.arange(case.shape[axis + 1], device=device).reshape(shape)
        active &= cell_index < local_max[:, axis].reshape(-1, 1, 1, 1)
    cells = torch.nonzero(active)  # (block, x, y, z), row-major
    empty = torch.zeros((0, 3), device=device)
    if len(cells) == 0:
        return empty.double(), empty.long(), torch.zeros((0,), dtype=torch.int64, device=device)
    cell_case = case[cells[:, 0], cells[:, 1], cells[:, 2], cells[:, 3]].long()
    global_cell = offsets[cells[:, 0]] + cells[:, 1:]
    order = torch.argsort((global_cell[:, 0] * gy + global_cell[:, 1]) * gz + global_cell[:, 2], stable=True)
    cells, cell_case, global_cell = cells[order], cell_case[order], global_cell[order]
    n_corners = counts[cell_case] * 3
    owner = torch.repeat_interleave(torch.arange(len(cells), device=device), n_corners)
    # position of each corner within its cell's list: 0, 1, 2, ... per cell
    first = torch.cumsum(n_corners, 0) - n_corners
    slot = torch.arange(len(owner), device=device) - first[owner]
    axis_corner = edge_axis_corner[table[cell_case[owner], slot]]
    axis = axis_corner[:, 0]
    lo = global_cell[owner] + axis_corner[:, 1:]  # the edge's lower grid point
    key = ((axis * gx + lo[:, 0]) * gy + lo[:, 1]) * gz + lo[:, 2]
    key, corner_vertex = torch.unique(key, return_inverse=True)
    # one corner standing for each crossed edge: its block and local lower point give the edge's two values
    rep = torch.empty(len(key), dtype=torch.int64, device=device).scatter_(
        0, corner_vertex, torch.arange(len(corner_vertex), device=device))
    axis, lo = axis[rep], lo[rep]
    block = cells[owner[rep], 0]
    local_lo = lo - offsets[block]
    local_hi = local_lo + torch.nn.functional.one_hot(axis, 3)
    f_lo = values[block, local_lo[:, 0], local_lo[:, 1], local_lo[:, 2]]
    f_hi = values[block, local_hi[:, 0], local_hi[:, 1], local_hi[:, 2]]
    # PyMCubes walks x edges from the upper end except on the grid's y == 0 row, y edges from the lower end
    # except on the x == 0 face, z edges always from the lower end.
    from_hi = ((axis == 0) & (lo[:, 1] != 0)) | ((axis == 1) & (lo[:, 0] == 0))
    f_start = torch.where(from_hi, f_hi, f_lo)
    f_end = torch.where(from_hi, f_lo, f_hi)
    start = torch.gather(lo, 1, axis[:, None])[:, 0].to(torch.float64) + from_hi.to(torch.float64)
    step = (0.0 - f_start) / (f_end - f_start)
    vertices = lo.to(torch.float64)
    vertices.scatter_(1, axis[:, None], torch.where(from_hi, start - step, start + step)[:, None])
    face_cells = ((global_cell[:, 0] * gy + global_cell[:, 1]) * gz + global_cell[:, 2])
    face_cells = torch.repeat_interleave(face_cells, counts[cell_case])
    return vertices, corner_vertex.reshape(-1, 3), face_cells
