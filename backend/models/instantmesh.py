"""InstantMesh stage 2: six generated views + their fixed cameras -> DINO ViT-B/16 whose LayerNorms are
modulated by each view's camera -> triplane transformer (learned tokens cross-attending to all views' tokens)
-> ×2 deconvolution -> triplanes. Then, in the mesh variants (instant-mesh-{large,base}): SDF, deformation and
FlexiCubes weights -> FlexiCubes mesh -> vertex colours; in the NeRF variants (instant-nerf-{large,base}): one
decoder for density and colour -> marching cubes on the density (iso 10, 256³) -> vertex colours.

Stage 1 (Zero123++ making the views from one image) is not here: this takes the 960×640 grid of six
320×320 views it produces. Loads the official checkpoint layout (``{'state_dict': ...}``, keys prefixed
``lrm_generator.``, fp32) strictly, with the YAML config of the reference (``model_config.params``).

Memory: the reference evaluates every head on all (R+1)³ vertices and all R³ cubes at once (16 GB at
R = 128 for large). Here the SDF is evaluated first, slab by slab; deformation and weights are then
evaluated on the cubes the surface crosses only, in chunks. FlexiCubes reads nothing else, so the
result is the same. Checked against the reference's outputs in tests/data/instantmesh_tiny.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import devices
from ..errors import InputError, WeightsError
from ..field import ColourField
from ..mesh import Mesh, truncate_to_bytes
from ..protocol import Stage
from . import flexicubes
from .checkpoint import assign_weights, load_safetensors_file, load_torch_file, named
from .lrm_transformer import TransformerDecoder, upsample_triplanes
from .triplane import EG3D_PLANE_AXES, TriplaneField, mlp_layers, sample_planes
from .vit import ViTConfig, ViTModel

MESH, NERF = "mesh", "nerf"
TARGETS = {"src.models.lrm_mesh.InstantMesh": MESH, "src.models.lrm.InstantNeRF": NERF}  # the reference's classes
KEY_PREFIX = "lrm_generator."
KNOWN_ENCODERS = {"facebook/dino-vitb16": ViTConfig()}  # ViTConfig's defaults are dino-vitb16's
NERF_PARAM_KEYS = {"encoder_feat_dim", "encoder_freeze", "encoder_model_name", "transformer_dim",
                   "transformer_layers", "transformer_heads", "triplane_low_res", "triplane_high_res", "triplane_dim",
                   "rendering_samples_per_ray"}
PARAM_KEYS = {MESH: NERF_PARAM_KEYS | {"grid_res", "grid_scale"}, NERF: NERF_PARAM_KEYS}
NERF_GRID_RES, NERF_ISO = 256, 10.0  # the reference's extract_mesh: marching cubes on σ over [-1, 1]³
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5  # facebook/dino-vitb16's processor (not ImageNet's)
HEAD_WIDTH, HEAD_HIDDEN_LAYERS = 64, 3
DEFORMATION_MULTIPLIER = 4.0  # deformation = tanh(raw) / (multiplier · grid_res)
WEIGHT_FACTOR = 0.1
COLOR_MARGIN = 0.001  # colour = sigmoid · (1 + 2·margin) − margin (MipNeRF)

# The six Zero123++ v1.2 views, row-major in the 3×2 grid, and their cameras (spec §2.1).
VIEW_SIZE, GRID_ROWS, GRID_COLS = 320, 3, 2
AZIMUTHS = (30.0, 90.0, 150.0, 210.0, 270.0, 330.0)
ELEVATIONS = (20.0, -10.0, 20.0, -10.0, 20.0, -10.0)
CAMERA_RADIUS, CAMERA_FOV = 4.0, 30.0

POINTS_PER_CHUNK = 1 << 15
CUBES_PER_CHUNK = 1 << 13  # net_weight's input is 8·3C floats per cube: 63 MB per chunk for large


@dataclass(frozen=True)
class InstantMeshConfig:
    encoder: ViTConfig
    transformer_dim: int
    transformer_layers: int
    transformer_heads: int
    triplane_low_res: int
    triplane_dim: int
    grid_res: int  # FlexiCubes grid (mesh) or marching-cubes grid (NeRF)
    grid_scale: float  # the FlexiCubes grid's side (mesh only; the NeRF grid spans [-1, 1]³)
    kind: str = MESH


def config_from_params(params: dict, encoders: Optional[dict] = None, source: str = "config",
                       kind: str = MESH) -> InstantMeshConfig:
    """``model_config.params`` of the reference's YAML -> config. ``encoders`` adds ViT configs by name."""
    missing, unknown = PARAM_KEYS[kind] - params.keys(), params.keys() - PARAM_KEYS[kind]
    if missing or unknown:
        raise WeightsError(f"{source} is not an InstantMesh config: " + "; ".join(
            f"{label} {sorted(keys)}" for label, keys in (("missing", missing), ("unknown", unknown)) if keys))
    name = params["encoder_model_name"]
    encoder = {**KNOWN_ENCODERS, **(encoders or {})}.get(name)
    if encoder is None:
        raise WeightsError(f"{source}: unknown image encoder {name!r}",
                           hint=f"InstantMesh uses {', '.join(KNOWN_ENCODERS)}.")
    if int(params["encoder_feat_dim"]) != encoder.hidden_size:
        raise WeightsError(f"{source}: encoder_feat_dim {params['encoder_feat_dim']} differs from the width "
                           f"{encoder.hidden_size} of {name}")
    if kind == NERF:
        params = {**params, "grid_res": NERF_GRID_RES, "grid_scale": 2.0}
    cfg = InstantMeshConfig(encoder=encoder, grid_scale=float(params["grid_scale"]), kind=kind, **{k: int(params[k]) for k in (
        "transformer_dim", "transformer_layers", "transformer_heads", "triplane_low_res", "triplane_dim", "grid_res")})
    if cfg.transformer_dim % cfg.transformer_heads:
        raise WeightsError(f"{source}: transformer_dim is not a multiple of transformer_heads")
    return cfg


def read_config(path: Path) -> tuple[InstantMeshConfig, dict]:
    """The reference's YAML (``configs/instant-mesh-*.yaml``) -> (config, its ``infer_config`` or {}).

    An encoder other than dino-vitb16 (the test fixtures' tiny one) is described by a top-level mapping
    named like it with '-' as '_' (e.g. ``tiny_dino``), holding ViTConfig fields."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        model = raw["model_config"]
        kind = TARGETS.get(model.get("target"))
        if kind is None:
            raise WeightsError(f"{path}: model {model.get('target')!r} is not supported (only "
                               f"{' and '.join(TARGETS)})")
        params = model["params"]
        name = str(params.get("encoder_model_name", ""))
        side = raw.get(name.replace("-", "_"))
        encoders = {name: ViTConfig.from_json_dict(side)} if isinstance(side, dict) else None
        return config_from_params(params, encoders, str(path), kind), dict(raw.get("infer_config") or {})
    except WeightsError:
        raise
    except (yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise WeightsError(f"{path} is not a valid InstantMesh config ({type(e).__name__}: {e})") from e


def input_cameras(radius: float = CAMERA_RADIUS, fov: float = CAMERA_FOV) -> torch.Tensor:
    """(6, 16): each view's cam-to-world [R|t] row-major (OpenGL camera axes, world Z up, looking at the
    origin), then fx, fy, cx, cy normalised by the image size. Computed as the reference does (positions
    in float64, the look-at frame in float32) to give its exact numbers."""
    az, el = np.deg2rad(np.array(AZIMUTHS)), np.deg2rad(np.array(ELEVATIONS))
    position = torch.from_numpy(radius * np.stack(
        [np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], axis=-1)).float()
    z = F.normalize(position, dim=-1)
    x = F.normalize(torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0]).expand_as(z), z, dim=-1), dim=-1)
    y = F.normalize(torch.linalg.cross(z, x, dim=-1), dim=-1)
    pose = torch.stack([x, y, z, position], dim=-1)  # (6, 3, 4)
    focal = torch.tensor(0.5 / np.tan(np.deg2rad(fov) * 0.5)).float()
    intrinsics = torch.stack([focal, focal, torch.tensor(0.5), torch.tensor(0.5)]).expand(len(AZIMUTHS), 4)
    return torch.cat([pose.reshape(-1, 12), intrinsics], dim=-1)


def views_from_grid(grid) -> torch.Tensor:
    """The 960×640 grid (a path, PIL image or (960, 640, 3) uint8 array) -> (6, 3, 320, 320) in [0, 1],
    view k from row k // 2, column k % 2."""
    from PIL import Image

    from ..preprocess import load_image

    if isinstance(grid, (str, Path)):
        grid = np.asarray(load_image(grid).convert("RGB"))
    elif isinstance(grid, Image.Image):
        grid = np.asarray(grid.convert("RGB"))
    grid = np.asarray(grid)
    want = (GRID_ROWS * VIEW_SIZE, GRID_COLS * VIEW_SIZE)
    if grid.ndim != 3 or grid.shape[:2] != want or grid.shape[2] != 3 or grid.dtype != np.uint8:
        raise InputError(f"the views image must be {want[1]}×{want[0]} RGB (3 rows × 2 columns of "
                         f"{VIEW_SIZE}² views), got {grid.shape[1::-1] if grid.ndim >= 2 else grid.shape}")
    views = torch.from_numpy(grid.astype(np.float32) / 255.0).permute(2, 0, 1)
    views = views.reshape(3, GRID_ROWS, VIEW_SIZE, GRID_COLS, VIEW_SIZE).permute(1, 3, 0, 2, 4)
    return views.reshape(GRID_ROWS * GRID_COLS, 3, VIEW_SIZE, VIEW_SIZE).contiguous()


def to_blender(vertices: np.ndarray) -> np.ndarray:
    """LRM world (Z up, front view on +X) -> Blender's (front view on -Y): -90° about Z, winding kept."""
    return np.stack([vertices[:, 1], -vertices[:, 0], vertices[:, 2]], axis=1)


def from_blender(vertices: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_blender`."""
    return np.stack([-vertices[:, 1], vertices[:, 0], vertices[:, 2]], axis=1)


class TriplaneTransformer(TransformerDecoder):
    """Learned triplane tokens -> unmodulated blocks -> final LayerNorm -> ×2 deconvolution per plane."""

    def __init__(self, cfg: InstantMeshConfig):
        dim = cfg.transformer_dim
        super().__init__(dim, cfg.transformer_layers, cfg.transformer_heads, cond_dim=cfg.encoder.hidden_size,
                         mod_dim=None)
        self.res = cfg.triplane_low_res
        self.pos_embed = nn.Parameter(torch.randn(1, 3 * self.res ** 2, dim) * dim ** -0.5)
        self.deconv = nn.ConvTranspose2d(dim, cfg.triplane_dim, kernel_size=2, stride=2)

    def planes(self, image_feats: torch.Tensor, check=None) -> torch.Tensor:
        """image tokens (B, M, C_enc) -> triplanes (B, 3, C, 2·res, 2·res)."""
        tokens = self.pos_embed.expand(image_feats.shape[0], -1, -1)
        return upsample_triplanes(self.deconv, self(tokens, image_feats, None, check), self.res)


class SparseViewLRM(nn.Module):
    """What both variants share: views -> triplanes, and the decoder heads read at points of the planes."""

    def __init__(self, cfg: InstantMeshConfig, heads: dict):
        super().__init__()
        self.cfg = cfg
        feat = cfg.encoder.hidden_size
        self.encoder = named(model=ViTModel(cfg.encoder, mod_dim=feat, pooler=False),
                              camera_embedder=nn.Sequential(nn.Linear(16, feat), nn.SiLU(), nn.Linear(feat, feat)))
        self.transformer = TriplaneTransformer(cfg)
        self.synthesizer = named(decoder=named(**{name: mlp_layers(n_in, HEAD_WIDTH, HEAD_HIDDEN_LAYERS, "relu", n_out)
                                                    for name, (n_in, n_out) in heads.items()}))

    @property
    def device(self) -> torch.device:
        return self.transformer.pos_embed.device

    @property
    def heads(self) -> nn.Module:
        return self.synthesizer.decoder

    @torch.no_grad()
    def embed_cameras(self, cameras: torch.Tensor) -> torch.Tensor:
        return self.encoder.camera_embedder(cameras.to(self.device))

    @torch.no_grad()
    def encode(self, views: torch.Tensor, cameras: torch.Tensor, check=None) -> torch.Tensor:
        """views (V, 3, H, W) in [0, 1], cameras (V, 16) -> per-view tokens (V, 1 + (H/16)·(W/16), C_enc)."""
        pixels = (views.to(self.device) - PIXEL_MEAN) / PIXEL_STD
        return self.encoder.model(pixels, check, mod=self.embed_cameras(cameras))

    @torch.no_grad()
    def triplanes(self, image_feats: torch.Tensor, check=None) -> torch.Tensor:
        """per-view tokens (V, L, C_enc), concatenated in view order -> planes (3, C, H, W)."""
        return self.transformer.planes(image_feats.reshape(1, -1, image_feats.shape[-1]), check)[0]

    @torch.no_grad()
    def features(self, planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """(3, C, H, W), points (N, 3) (the planes span [-1, 1]³; beyond, zeros) -> (N, 3C)."""
        return sample_planes(planes, points.to(planes), EG3D_PLANE_AXES)

    @torch.no_grad()
    def head(self, name: str, planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """One decoder head at points, in chunks on the model's device; the result on the CPU, where the
        surface is extracted (FlexiCubes and marching cubes run there on every device)."""
        net = getattr(self.heads, name)
        out = [net(self.features(planes, p)).cpu() for p in points.split(POINTS_PER_CHUNK)]
        return torch.cat(out) if out else torch.zeros(0, net[-1].out_features)

    def planes_from_views(self, grid, options, stages) -> tuple[torch.Tensor, dict]:
        """Stage 2's field from the 960×640 grid of six views (path, PIL image or uint8 array)."""
        views = views_from_grid(grid)
        dtype = devices.resolve_precision(getattr(options, "precision", "auto"), self.device)
        # Half precision (autocast) for the camera-modulated ViT and the triplane transformer; planes back in
        # fp32, and the SDF/deformation/weight heads and FlexiCubes in fp32 (the SDF's sign decides the surface).
        with devices.autocast(self.device, dtype):
            stages.begin(Stage.ENCODE, "encoding the views")
            feats = self.encode(views, input_cameras(), stages.check)
            stages.begin(Stage.TRIPLANE, "building triplanes")
            planes = self.triplanes(feats, stages.check)
        return planes.float(), {"generated_views": GRID_ROWS * GRID_COLS, "precision": devices.precision_name(dtype)}

    def reconstruct_views(self, grid, options, stages) -> Mesh:
        planes, used = self.planes_from_views(grid, options, stages)
        mesh = self.mesh_from(planes, options, stages)
        mesh.stats.update(used)
        return mesh

    def mesh_from(self, planes: torch.Tensor, options, stages) -> Mesh:
        """-> Mesh in Blender's frame, colours truncated to bytes as the reference does.
        ``options.resolution``: the surface grid (None: the config's)."""
        res = int(options.resolution or self.cfg.grid_res)
        vertices, faces, colors = self.surface(planes, res, options, stages)
        return Mesh(to_blender(np.asarray(vertices, np.float32)), np.asarray(faces), truncate_to_bytes(colors),
                    stats={"resolution": res})

    def colour_field(self, planes: torch.Tensor) -> ColourField:
        planes = planes.to(self.device)
        return ColourField(lambda p: self.point_colours(planes, p), from_blender, self.device,
                           finish=truncate_to_bytes)

    def point_colours(self, planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Colour (N, 3) in [0, 1] at points of the LRM frame, as the variant colours its vertices."""
        raise NotImplementedError

    def surface(self, planes: torch.Tensor, res: int, options, stages):
        """planes -> vertices (V, 3), faces (F, 3) in the LRM frame, colours (V, 3) in [0, 1], as numpy."""
        raise NotImplementedError


class InstantMesh(SparseViewLRM):
    """The mesh variants: SDF, deformation and FlexiCubes weights, then FlexiCubes at SDF 0."""

    def __init__(self, cfg: InstantMeshConfig):
        c3 = 3 * cfg.triplane_dim
        super().__init__(cfg, {"net_sdf": (c3, 1), "net_rgb": (c3, 3), "net_deformation": (c3, 3),
                               "net_weight": (8 * c3, 21)})

    def colors(self, planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Colour (N, 3) at points, before clamping (the reference's ``get_texture_prediction``)."""
        return torch.sigmoid(self.head("net_rgb", planes, points)) * (1 + 2 * COLOR_MARGIN) - COLOR_MARGIN

    def point_colours(self, planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        return self.colors(planes, points).clamp(0, 1)

    def deformation(self, planes: torch.Tensor, vertices: torch.Tensor, res: int) -> torch.Tensor:
        return torch.tanh(self.head("net_deformation", planes, vertices)) / (DEFORMATION_MULTIPLIER * res)

    @torch.no_grad()
    def cube_weights(self, planes: torch.Tensor, corners: torch.Tensor, res: int, scale: float) -> torch.Tensor:
        """Raw FlexiCubes weights (M, 21) of cubes given by their corner vertex ids (M, 8): ``net_weight`` on
        the 8 corners' features (undeformed positions) concatenated in corner order, × 0.1."""
        out = []
        for chunk in corners.split(CUBES_PER_CHUNK):
            ids, inverse = torch.unique(chunk, return_inverse=True)
            feats = self.features(planes, flexicubes.grid_vertices(res, scale, ids))
            out.append(self.heads.net_weight(feats[inverse].reshape(len(chunk), -1)).cpu() * WEIGHT_FACTOR)
        return torch.cat(out) if out else torch.zeros(0, 21)

    @torch.no_grad()
    def grid_sdf(self, planes: torch.Tensor, res: int, scale: float, on_fraction=None) -> torch.Tensor:
        """SDF at all (res+1)³ grid vertices (x-major), a few x slabs at a time."""
        n = res + 1
        sdf = torch.empty(n ** 3)
        per_step = max(1, POINTS_PER_CHUNK * 4 // (n * n))
        for i0 in range(0, n, per_step):
            ids = torch.arange(i0 * n * n, min(n, i0 + per_step) * n * n)
            sdf[ids] = self.head("net_sdf", planes, flexicubes.grid_vertices(res, scale, ids))[:, 0]
            if on_fraction:
                on_fraction(min(n, i0 + per_step) / n)
        return repair_empty_shape(sdf, res, scale)

    @torch.no_grad()
    def extract_geometry(self, planes: torch.Tensor, res: Optional[int] = None, on_fraction=None):
        """planes (3, C, H, W) -> vertices (V, 3), faces (F, 3) in the LRM frame, every dual vertex kept (as
        the reference returns them, also those no face uses)."""
        res = int(res or self.cfg.grid_res)
        scale = self.cfg.grid_scale
        sdf = self.grid_sdf(planes, res, scale, on_fraction and (lambda f: on_fraction(0.8 * f)))
        cubes, cases = flexicubes.surface_cubes(sdf, res)
        corners = flexicubes.cube_corners(cubes, res)
        ids, inverse = torch.unique(corners, return_inverse=True)
        rest = flexicubes.grid_vertices(res, scale, ids)
        moved = rest + self.deformation(planes, rest, res)
        weights = self.cube_weights(planes, corners, res, scale)
        if on_fraction:
            on_fraction(0.95)
        return flexicubes.extract(cubes, cases, moved[inverse], sdf[corners], weights, res)

    def extract(self, planes: torch.Tensor, res: Optional[int] = None):
        """The reference's ``extract_mesh`` without a texture map: geometry + colours (V, 3) clamped to
        [0, 1] (still float)."""
        vertices, faces = self.extract_geometry(planes, res)
        return vertices, faces, self.colors(planes, vertices).clamp(0, 1)

    def surface(self, planes: torch.Tensor, res: int, options, stages):
        """FlexiCubes, unused dual vertices dropped, colours clamped to [0, 1]."""
        stages.begin(Stage.SURFACE, f"FlexiCubes at {res}³")
        vertices, faces = self.extract_geometry(planes, res, on_fraction=stages.update)
        if len(faces) == 0:
            raise InputError("no surface found: the model sees no object in these views",
                             hint="Use views of one clear object on a white background.")
        stages.begin(Stage.COLOR, "colouring vertices")
        used, faces = torch.unique(faces, return_inverse=True)
        vertices = vertices[used]
        return vertices.numpy(), faces.numpy(), self.colors(planes, vertices).clamp(0, 1).numpy()


class InstantNeRF(SparseViewLRM):
    """The NeRF variants: one decoder ``net`` gives σ = softplus(raw − 1) and the colour, as OpenLRM's does; the
    mesh is marching cubes on σ at the threshold (the reference's 10) over [-1, 1]³."""

    def __init__(self, cfg: InstantMeshConfig):
        super().__init__(cfg, {"net": (3 * cfg.triplane_dim, 4)})

    def field(self, planes: torch.Tensor) -> TriplaneField:
        return TriplaneField(planes, self.heads.net, radius=1.0, density_bias=-1.0, plane_axes=EG3D_PLANE_AXES,
                             density_activation="softplus", color_margin=COLOR_MARGIN)

    def point_colours(self, planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        return self.field(planes).query(points)[1].clamp(0, 1)

    def surface(self, planes: torch.Tensor, res: int, options, stages):
        from ..surface import colored_surface

        threshold = NERF_ISO if options.threshold is None else float(options.threshold)
        vertices, faces, colors = colored_surface(self.field(planes), res, threshold, stages, dense=options.dense)
        return vertices, faces, np.clip(colors, 0.0, 1.0)


MODEL_CLASSES = {MESH: InstantMesh, NERF: InstantNeRF}


def repair_empty_shape(sdf: torch.Tensor, res: int, scale: float) -> torch.Tensor:
    """The reference's fallback when the SDF has one sign on every interior vertex: the vertex nearest the
    centre becomes 1 − min(sdf) and the outer vertex layer −1 − max(sdf), so that a surface exists."""
    n = res + 1
    interior = sdf.reshape(n, n, n)[1:-1, 1:-1, 1:-1]
    if (interior > 0).any() and (interior < 0).any():
        return sdf
    lo, hi = sdf.min(), sdf.max()
    fixed = sdf.clone().reshape(n, n, n)
    fixed[0], fixed[-1], fixed[:, 0], fixed[:, -1], fixed[:, :, 0], fixed[:, :, -1] = (-1 - hi,) * 6
    centre = int(torch.argmin((flexicubes.grid_vertices(res, scale) ** 2).sum(-1)))
    fixed.view(-1)[centre] = 1 - lo
    return fixed.reshape(-1)


def read_state_dict(path: Path) -> dict:
    """The official ``.ckpt`` (``{'state_dict': ...}``, keys ``lrm_generator.*``; other keys are dropped
    as the reference's run.py drops them) or a converted ``.safetensors`` (prefix optional) -> model keys."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_safetensors_file(path)
        if not any(k.startswith(KEY_PREFIX) for k in state):
            return state
    else:
        state = load_torch_file(path, entry="state_dict")
    out = {k[len(KEY_PREFIX):]: v for k, v in state.items() if k.startswith(KEY_PREFIX)}
    if not out:
        raise WeightsError(f"{path.name} holds no '{KEY_PREFIX}*' weights: not an InstantMesh checkpoint")
    return out


def load(config: Path, device: torch.device, weights: Optional[Path] = None) -> SparseViewLRM:
    """Build from the YAML ``config`` and strictly load ``weights`` (default: the file named by the
    config's ``infer_config.model_path``, looked up beside the config)."""
    config = Path(config)
    cfg, infer = read_config(config)
    if weights is None:
        if not infer.get("model_path"):
            raise WeightsError(f"{config} names no weights (infer_config.model_path) and none were given")
        weights = config.parent / Path(str(infer["model_path"])).name
    with torch.device("meta"):
        model = MODEL_CLASSES[cfg.kind](cfg)
    model = assign_weights(model, read_state_dict(weights), str(weights))
    return model.to(device) if device.type != "cpu" else model
