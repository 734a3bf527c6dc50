"""The backend's half of tests/blender/test_paint_truth.py, run by the backend's Python (torch, scipy, xatlas):

    python tests/blender/paint_backend.py FOLDER

FOLDER/mesh.npz holds the object (vertices, faces in the generation's frame); FOLDER/views.json the renders
(RGBA PNG paths, straight alpha) and the model whose cameras they were rendered from. The mesh gets a UV atlas
of its own (xatlas, as Bake from Model makes one), then three textures: painted through the backend's
painting (postprocess.colours.painting_for: the model's cameras, the framing fitted), the share each texel
took from the views (what the views saw), and a field-style bake: the painted colours known only on a 64³ grid
(the resolution of the models' triplanes), read back trilinearly, as a colour field gives them.
"""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from backend.mesh import triangulate  # noqa: E402
from backend.postprocess import bake  # noqa: E402
from backend.postprocess.atlas import unwrap_faces  # noqa: E402
from backend.postprocess.colours import painting_for  # noqa: E402
from backend.postprocess.paint import View, Painter, paint_texture  # noqa: E402
from backend.postprocess import cameras  # noqa: E402
from backend.progress import Stages  # noqa: E402

SIZE = 2048
FIELD_GRID = 64


class Model:
    def __init__(self, kind):
        self.conditioning_camera = kind


def field_style(positions, colours, lo, hi):
    """colours known at ``positions`` -> a trilinear lookup into their FIELD_GRID³ voxel averages."""
    from scipy import ndimage

    scale = (FIELD_GRID - 1) / np.maximum(hi - lo, 1e-9)
    cell = np.clip(np.rint((positions - lo) * scale).astype(np.int64), 0, FIELD_GRID - 1)
    flat = np.ravel_multi_index(cell.T, (FIELD_GRID,) * 3)
    total = np.zeros((FIELD_GRID ** 3, 4))
    np.add.at(total, flat, np.concatenate([colours, np.ones((len(colours), 1))], axis=1))
    grid = total.reshape(FIELD_GRID, FIELD_GRID, FIELD_GRID, 4)
    # Empty cells take their filled neighbours' mean, so trilinear reads near the surface never see zeros.
    for _ in range(2):
        grown = ndimage.uniform_filter(grid, size=(3, 3, 3, 1), mode="nearest")
        empty = grid[..., 3] == 0
        grid[empty] = grown[empty]
    rgb = grid[..., :3] / np.maximum(grid[..., 3:], 1e-12)

    def lookup(points):
        coords = ((np.asarray(points, np.float64) - lo) * scale).T
        return np.stack([ndimage.map_coordinates(rgb[..., k], coords, order=1, mode="nearest") for k in range(3)],
                        axis=1)

    return lookup


def main(folder: Path) -> int:
    with np.load(folder / "mesh.npz") as data:
        vertices, faces = data["vertices"].astype(np.float32), data["faces"].astype(np.int64)
    spec = json.loads((folder / "views.json").read_text())
    shift = np.asarray(spec.get("shift", (0, 0, 0)), np.float32)  # the misfit check: the mesh moved
    vertices = vertices + shift
    faces2, uvs, _, _ = unwrap_faces(vertices, faces, SIZE)
    tris, tri_uvs = triangulate(faces2, uvs)
    stages = Stages(None, None)
    pictures = {}
    for view in spec["views"]:
        with Image.open(folder / view["png"]) as im:
            pictures[view["name"]] = np.asarray(im.convert("RGBA"))
    grid = None
    if "grid" in spec:
        with Image.open(folder / spec["grid"]) as im:
            grid = np.asarray(im.convert("RGB"))
    if spec.get("fit", True):
        painting = painting_for(Model(spec["kind"]), pictures.get("picture"), grid, vertices, faces2, stages)
        painter = painting.painter(vertices, faces2)
        texture = painting.texture(vertices, faces2, tris, tri_uvs, SIZE, None, stages)
        about, shares = painting.about, painting.shares
    else:  # the cameras exactly as the model fixes them, no framing fitted: the mask's edge alone keeps it clean
        rgba = pictures["picture"].astype(np.float32) / 255
        view = View(rgba[..., :3], rgba[..., 3], cameras.reference_camera(spec["kind"]))
        painter = Painter(vertices, faces2, [view])
        texture, _, share = paint_texture(painter, tris, tri_uvs, SIZE, None)
        about, shares = [], {"texture": share}
    samples = bake.texel_samples(vertices, tris, tri_uvs, SIZE)
    corners = vertices[tris]
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-20)
    _, alpha, _ = painter.paint(samples.positions, normals.astype(np.float32)[samples.triangle])
    seen = np.zeros((SIZE, SIZE), np.uint8)
    seen[samples.rows, samples.cols] = np.rint(alpha * 255).astype(np.uint8)
    painted = texture[samples.rows, samples.cols].astype(np.float64) / 255
    lookup = field_style(samples.positions.astype(np.float64), painted, vertices.min(0), vertices.max(0))
    field_texture, _ = bake.bake(vertices, tris, tri_uvs, SIZE, lookup)
    Image.fromarray(texture).save(folder / "painted.png")
    Image.fromarray(seen).save(folder / "seen.png")
    Image.fromarray(field_texture).save(folder / "field.png")
    texel_mask = np.zeros((SIZE, SIZE), bool)
    texel_mask[samples.rows, samples.cols] = True
    np.savez(folder / "unwrapped.npz", vertices=vertices, faces=faces2, uvs=uvs, texel_mask=texel_mask)
    (folder / "report.json").write_text(json.dumps({"views": about, "shares": shares}))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
