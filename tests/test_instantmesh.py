"""InstantMesh stage 2 (mesh variants) against the reference: parity with the tiny fixture stage by stage
(cameras, encoder, triplanes, heads, FlexiCubes, colours), the FlexiCubes tables derived here, the official
key layouts of large/base, strict loading, the views grid, progress and cancellation."""

import itertools
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from scipy.spatial import cKDTree
from support import DATA

from backend.errors import Cancelled, InputError, WeightsError
from backend.models import flexicubes as fc
from backend.models import instantmesh as im
from backend.models.checkpoint import check_state_dict
from backend.options import Options
from backend.progress import Stages

TINY = DATA / "instantmesh_tiny"
CONFIG, CKPT, GRID = TINY / "tiny_config.yaml", TINY / "tiny_instant_mesh.ckpt", TINY / "views_grid_960x640.png"
MANIFEST = DATA / "instantmesh_state_dict_manifest_{}.json"
RES = 32


def max_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b)
    assert a.shape == b.shape, f"{a.shape} != {b.shape}"
    return float(np.abs(a - b).max())


@pytest.fixture(scope="module")
def expected():
    with np.load(TINY / "expected.npz") as e:
        return {k: e[k] for k in e.files}


@pytest.fixture(scope="module")
def model():
    return im.load(CONFIG, torch.device("cpu"))


def match_mesh(vertices, faces, ref_vertices, ref_faces, atol=1e-4):
    """Order-independent: every vertex has its own reference vertex within ``atol`` (a bijection), and the
    faces are the same oriented triangles. Returns the map from our vertices to the reference's."""
    vertices, faces = np.asarray(vertices), np.asarray(faces)
    assert vertices.shape == ref_vertices.shape and faces.shape == ref_faces.shape
    dist, index = cKDTree(ref_vertices).query(vertices)
    assert dist.max() <= atol, f"vertices differ by {dist.max()}"
    assert len(np.unique(index)) == len(index)

    def oriented(f):  # rotate each triangle so that its smallest index comes first (keeps the winding)
        r = np.argmin(f, axis=1)[:, None]
        return {tuple(t) for t in np.take_along_axis(f, (r + np.arange(3)) % 3, axis=1)}

    assert oriented(index[faces]) == oriented(ref_faces)
    return index


# -- reference parity ------------------------------------------------------------------------------------

def test_cameras_and_views(expected):
    assert max_error(im.input_cameras()[None], expected["input_cameras"]) == 0
    views = im.views_from_grid(GRID)
    grid = np.asarray(Image.open(GRID).convert("RGB"))
    assert views.shape == (6, 3, 320, 320)
    for k in range(6):  # row-major: view k at row k // 2, column k % 2
        tile = grid[320 * (k // 2):320 * (k // 2 + 1), 320 * (k % 2):320 * (k % 2 + 1)]
        assert torch.equal(views[k], torch.from_numpy(tile.astype(np.float32) / 255).permute(2, 0, 1))
    with pytest.raises(InputError, match="960"):
        im.views_from_grid(grid[:640])


def test_encoder_and_triplanes(model, expected):
    cameras = im.input_cameras()
    assert max_error(model.embed_cameras(cameras)[None], expected["camera_embeddings"]) <= 1e-5
    feats = model.encode(im.views_from_grid(GRID), cameras)
    assert max_error(feats, expected["image_feats"]) <= 1e-4
    assert max_error(model.triplanes(torch.from_numpy(expected["image_feats"]))[None], expected["planes"]) <= 1e-4
    assert max_error(model.triplanes(feats)[None], expected["planes"]) <= 1e-4


def test_heads_on_the_grid(model, expected):
    planes = torch.from_numpy(expected["planes"][0])
    vertices = fc.grid_vertices(RES, 2.1)
    assert max_error(vertices, expected["grid_verts"]) == 0
    assert np.array_equal(fc.cube_corners(torch.arange(RES ** 3), RES).numpy(), expected["grid_cubes"])
    assert max_error(model.grid_sdf(planes, RES, 2.1), expected["sdf"]) <= 1e-4
    assert max_error(model.head("net_deformation", planes, vertices), expected["deformation_raw"]) <= 1e-4
    assert max_error(model.deformation(planes, vertices, RES), expected["deformation"]) <= 1e-6
    weights = model.cube_weights(planes, torch.from_numpy(expected["grid_cubes"]).long(), RES, 2.1)
    assert max_error(weights, expected["flexicubes_weight"]) <= 1e-4


def run_flexicubes(e, tunnel_fix=True):
    sdf = torch.from_numpy(e["sdf"])
    cubes, cases = fc.surface_cubes(sdf, RES)
    if not tunnel_fix:
        cases = fc.case_ids(sdf < 0, RES, cubes)
    corners = fc.cube_corners(cubes, RES)
    moved = torch.from_numpy(e["grid_verts"] + e["deformation"])
    return fc.extract(cubes, cases, moved[corners], sdf[corners], torch.from_numpy(e["flexicubes_weight"])[cubes], RES)


def test_flexicubes_on_the_reference_inputs(expected):
    """The pure function: the fixture's own SDF, deformation and weights give the reference mesh exactly
    (same dual vertices, same oriented triangles): this proves the derived tables."""
    vertices, faces = run_flexicubes(expected)
    match_mesh(vertices, faces, expected["mesh_vertices"], expected["mesh_faces"], atol=1e-5)


def test_mesh_and_colours_from_planes(model, expected):
    vertices, faces, colors = model.extract(torch.from_numpy(expected["planes"][0]))
    index = match_mesh(vertices, faces, expected["mesh_vertices"], expected["mesh_faces"])
    assert max_error(colors, np.clip(expected["mesh_vertex_colors_float"][index], 0, 1)) <= 1e-4
    ours = (colors.numpy() * 255).astype(np.uint8).astype(int)
    assert np.abs(ours - expected["mesh_vertex_colors"][index]).max() <= 1


class Recorder(Stages):
    def __init__(self, cancel_in=None):
        self.events = []
        super().__init__(lambda stage, fraction, message: self.events.append((stage, fraction)),
                         lambda: cancel_in is not None and len(self.events) >= cancel_in)


def test_reconstruct_views_end_to_end(model, expected):
    stages = Recorder()
    mesh = model.reconstruct_views(GRID, Options(), stages)
    assert [s for s, f in stages.events if f == 0] == ["encoding", "building_triplanes", "extracting_surface",
                                                       "colouring"]
    # Unused dual vertices dropped; Blender's frame; colours as the reference's bytes.
    used = np.unique(expected["mesh_faces"])
    ref_faces = np.searchsorted(used, expected["mesh_faces"])
    index = match_mesh(mesh.vertices, mesh.faces, im.to_blender(expected["mesh_vertices"][used]), ref_faces)
    ref_bytes = expected["mesh_vertex_colors"][used][index].astype(int)
    assert np.abs(np.rint(mesh.colors * 255).astype(int) - ref_bytes).max() <= 1
    assert mesh.stats["resolution"] == RES


def test_reconstruct_views_cancels(model):
    with pytest.raises(Cancelled):
        model.reconstruct_views(GRID, Options(), Recorder(cancel_in=3))


def test_blender_frame():
    # LRM world: the front (input) view looks from +X. Blender: from -Y. Z stays up; a rotation keeps winding.
    assert np.array_equal(im.to_blender(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])),
                          [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def test_empty_shape_repair():
    sdf = torch.ones((RES + 1) ** 3)
    fixed = im.repair_empty_shape(sdf, RES, 2.1).reshape(RES + 1, RES + 1, RES + 1)
    assert fixed[RES // 2, RES // 2, RES // 2] == 0 and (fixed[0] == -2).all() and (fixed[:, :, -1] == -2).all()
    assert (fixed[1:-1, 1:-1, 1:-1] == 1).sum() == (RES - 1) ** 3 - 1
    mixed = torch.randn((RES + 1) ** 3)
    assert im.repair_empty_shape(mixed, RES, 2.1) is mixed


# -- FlexiCubes tables derived here ------------------------------------------------------------------------

def symmetries():
    """The 48 symmetries of the cube as corner permutations."""
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((0, 1), repeat=3):
            yield [sum((fc.CORNERS[c][perm[a]] ^ flips[a]) << a for a in range(3)) for c in range(8)]


def partition(case, group_table=fc.TABLES.edge_group):
    groups = {}
    for e, g in enumerate(group_table[case]):
        if g >= 0:
            groups.setdefault(g, set()).add(e)
    return {frozenset(s) for s in groups.values()}


def test_tables_basic_properties():
    t = fc.TABLES
    inside = (np.arange(256)[:, None] >> np.arange(8)) & 1
    a, b = np.array(fc.EDGES).T
    crossed = inside[:, a] != inside[:, b]
    assert np.array_equal(t.edge_group >= 0, crossed)  # every crossed edge in exactly one patch
    assert t.num_patches.max() == 4 and t.num_patches[0] == t.num_patches[255] == 0
    for case in range(256):
        groups = partition(case)
        assert len(groups) == t.num_patches[case]
        assert all(3 <= len(g) <= 7 for g in groups)  # a patch is a polygon of 3..7 crossings
    # Known cases: one corner -> a triangle; two diagonal corners on a face -> two triangles (inside
    # corners are kept apart); their complement -> one hexagon; two opposite corners -> two triangles.
    assert partition(0b1) == {frozenset({0, 3, 8})}
    assert [len(g) for g in partition(0b1001)] == [3, 3] and [len(g) for g in partition(255 - 0b1001)] == [6]
    assert t.num_patches[0b10000001] == 2


def test_tables_are_symmetric():
    """Rotating or mirroring a cube maps its patches onto the patches of the rotated case."""
    edge_index = {frozenset(e): i for i, e in enumerate(fc.EDGES)}
    for m in symmetries():
        edge_map = [edge_index[frozenset((m[x], m[y]))] for x, y in fc.EDGES]
        for case in range(256):
            image = sum(((case >> c) & 1) << m[c] for c in range(8))
            assert {frozenset(edge_map[e] for e in g) for g in partition(case)} == partition(image)
            assert fc.TABLES.tunnel[case] == fc.TABLES.tunnel[image]


def test_tunnel_cases():
    t = fc.TABLES
    tunnels = np.nonzero(t.tunnel)[0]
    assert len(tunnels) == 36
    classes = {min(sum(((c >> i) & 1) << m[i] for i in range(8)) for m in symmetries()) for c in tunnels}
    assert len(classes) == 2  # the two ambiguous configurations ("C16", "C19")
    for case in tunnels:
        offset = t.tunnel_offset[case]
        assert np.abs(offset).sum() == 1
        axis, side = int(np.nonzero(offset)[0][0]), int(offset.sum() > 0)
        face = [c for c in range(8) if fc.CORNERS[c][axis] == side]
        face_edges = [e for e, (x, y) in enumerate(fc.EDGES) if x in face and y in face]
        assert len({t.edge_group[case, e] for e in face_edges}) == 1  # the face's 4 crossings: one patch
        replacement = t.tunnel_case[case]
        assert not t.tunnel[replacement] and np.array_equal(t.edge_group[replacement] >= 0, t.edge_group[case] >= 0)
        assert len({t.edge_group[replacement, e] for e in face_edges}) == 2


def test_tunnel_fix_keeps_the_mesh_manifold(expected):
    def max_faces_per_edge(faces):
        f = faces.numpy()
        edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
        return np.unique(edges, axis=0, return_counts=True)[1].max()

    assert max_faces_per_edge(run_flexicubes(expected)[1]) == 2
    assert max_faces_per_edge(run_flexicubes(expected, tunnel_fix=False)[1]) > 2


def test_grid_at_full_resolution():
    axis = fc.grid_axis(128, 2.1)
    assert len(axis) == 129 and bool((axis[1:] > axis[:-1]).all())
    assert max_error(axis, np.linspace(-1.05, 1.05, 129)) <= 2e-5  # the reference rounds k/128 to 5 decimals
    assert float(axis[64]) == 0.0


# -- checkpoint layout and strict loading ------------------------------------------------------------------

@pytest.mark.parametrize("size", ["large", "base"])
def test_official_layouts(size):
    manifest = json.loads(MANIFEST.with_name(MANIFEST.name.format(size)).read_text())
    cfg = im.config_from_params(manifest["model_params"])
    with torch.device("meta"):
        model = im.InstantMesh(cfg)
    state = model.state_dict()
    expected = {k[len(manifest["key_prefix_on_disk"]):]: v["shape"] for k, v in manifest["tensors"].items()}
    check_state_dict(expected, {k: v.shape for k, v in state.items()}, f"manifest {size}")
    assert all(v["dtype"] == "float32" for v in manifest["tensors"].values())
    assert sum(v.numel() for v in state.values()) == manifest["num_params"]
    assert (cfg.grid_res, cfg.grid_scale) == (128, 2.1)


def rewrite(tmp_path, edit=None, config_edit=None):
    state = torch.load(CKPT, weights_only=True)
    if edit:
        edit(state)
    torch.save(state, tmp_path / CKPT.name)
    raw = yaml.safe_load(CONFIG.read_text())
    if config_edit:
        config_edit(raw)
    (tmp_path / CONFIG.name).write_text(yaml.safe_dump(raw))
    return tmp_path / CONFIG.name


KEY = "lrm_generator.synthesizer.decoder.net_weight.6.bias"


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["state_dict"].pop(KEY), "1 missing"),
    (lambda s: s["state_dict"].update({"lrm_generator.extra": torch.zeros(1)}), "1 unexpected"),
    (lambda s: s["state_dict"].update({KEY: torch.zeros(20)}), "wrong shape"),
    (lambda s: s["state_dict"].update({KEY: torch.zeros(21, dtype=torch.float64)}), "unexpected type"),
    (lambda s: s.update({"model": s.pop("state_dict")}), "no 'state_dict' entry"),
    (lambda s: s.update({"state_dict": {k[14:]: v for k, v in s["state_dict"].items()}}), "no 'lrm_generator"),
])
def test_strict_loading_fails(tmp_path, edit, message):
    with pytest.raises(WeightsError, match=message):
        im.load(rewrite(tmp_path, edit), torch.device("cpu"))


@pytest.mark.parametrize("config_edit, message", [
    (lambda c: c["model_config"].update({"target": "src.models.lrm.Other"}), "not supported"),
    (lambda c: c["model_config"].update({"target": "src.models.lrm.InstantNeRF"}), r"unknown \['grid_res', 'grid_scale'\]"),
    (lambda c: [c["model_config"].update({"target": "src.models.lrm.InstantNeRF"}),
                c["model_config"]["params"].pop("grid_res"), c["model_config"]["params"].pop("grid_scale")],
     "does not match the model's layout: 8 missing: synthesizer.decoder.net.0.weight"),  # a mesh checkpoint
    (lambda c: c["model_config"]["params"].update({"encoder_model_name": "other"}), "unknown image encoder"),
    (lambda c: c["model_config"]["params"].pop("grid_res"), "missing"),
    (lambda c: c["model_config"]["params"].update({"triplane_dim": 9}), "wrong shape"),
])
def test_bad_configs(tmp_path, config_edit, message):
    with pytest.raises(WeightsError, match=message):
        im.load(rewrite(tmp_path, config_edit=config_edit), torch.device("cpu"))


def test_other_keys_dropped_and_weights_path(tmp_path, expected):
    # run.py keeps only 'lrm_generator.*'; the weights may also be named explicitly.
    config = rewrite(tmp_path, lambda s: s["state_dict"].update({"lpips.net.weight": torch.zeros(3)}))
    shutil.move(tmp_path / CKPT.name, tmp_path / "renamed.ckpt")
    with pytest.raises(WeightsError, match="not found"):
        im.load(config, torch.device("cpu"))
    model = im.load(config, torch.device("cpu"), weights=tmp_path / "renamed.ckpt")
    assert max_error(model.embed_cameras(im.input_cameras())[None], expected["camera_embeddings"]) <= 1e-5
