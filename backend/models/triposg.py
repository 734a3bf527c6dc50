"""TripoSG (VAST-AI/TripoSG): DINOv2 image tokens condition a rectified-flow DiT that draws 2048 shape-latent
tokens from noise; the shape VAE's decoder answers the signed field at any point; the surface is its zero level.

Loads the official folder unchanged (diffusers layout): ``model_index.json``, ``transformer/``, ``vae/``,
``image_encoder_dinov2/``, ``feature_extractor_dinov2/``, ``scheduler/``; safetensors and JSON only, every key and
shape checked against the configs before any tensor is read. Written from the reference
(VAST-AI-Research/TripoSG, ``triposg/``); checked against its outputs in tests/data/triposg_tiny.

The model makes no colour (:meth:`TripoSG.colour_field` is None: the post-processing paints it grey). The latents
stand where the other models' triplanes do: the field cache keeps them, Retopologize and Bake reuse them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import devices, surface
from ..colour import GREY
from ..errors import InputError, WeightsError, first_line
from ..mesh import Mesh
from ..options import SHAPE_DEFAULTS
from ..protocol import Stage
from .checkpoint import check_state_dict
from .rectified_flow import FlowConfig, sample
from .triposg_dit import DiTConfig, TripoSGDiT
from .triposg_image import Dinov2, Dinov2Config, ImagePrep
from .triposg_vae import ENCODER_PREFIXES, FourierEmbedding, ShapeVAE, VAEConfig

STEPS, GUIDANCE, SEED = SHAPE_DEFAULTS["steps"], SHAPE_DEFAULTS["guidance"], SHAPE_DEFAULTS["seed"]
NUM_TOKENS = 2048  # latent tokens, the reference pipeline's default
BOX = 1.005  # the reference's bounds: the grid spans [-BOX, BOX]³
RESOLUTIONS = (128, 256, 512, 1024)  # grid points per axis (the reference's octree depths 7..10)
CONFIGS = {"model_index": "model_index.json", "transformer": "transformer/config.json", "vae": "vae/config.json",
           "image_encoder": "image_encoder_dinov2/config.json",
           "feature_extractor": "feature_extractor_dinov2/preprocessor_config.json",
           "scheduler": "scheduler/scheduler_config.json"}
WEIGHTS = {"image_encoder_dinov2": "image_encoder_dinov2/model.safetensors",
           "transformer": "transformer/diffusion_pytorch_model.safetensors",
           "vae": "vae/diffusion_pytorch_model.safetensors"}
FILES = tuple(CONFIGS.values()) + tuple(WEIGHTS.values())
COMPONENTS = ("vae", "transformer", "scheduler", "image_encoder_dinov2", "feature_extractor_dinov2")
FLOAT_TYPES = {"F32", "F16", "BF16"}  # the file's type; the weights are kept as float32 (autocast runs half)
QUERY_ROWS = 256  # chunks are padded to a multiple of this: a point's value does not depend on its chunk
MIN_CHUNK, MAX_CHUNK = 4096, 1 << 17  # decoder queries per call, sized to free memory (query_chunk)


@dataclass(frozen=True)
class TripoSGConfig:
    dit: DiTConfig
    vae: VAEConfig
    dino: Dinov2Config
    prep: ImagePrep
    flow: FlowConfig


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise WeightsError(f"{path} not found", hint="The folder must hold the files of VAST-AI/TripoSG.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path} is not valid JSON ({first_line(e, 200)})") from e
    if not isinstance(data, dict):
        raise WeightsError(f"{path} is not a JSON object")
    return data


def read_config(folder: Path) -> TripoSGConfig:
    raw = {name: _read_json(folder / rel) for name, rel in CONFIGS.items()}
    missing = [c for c in COMPONENTS if c not in raw["model_index"]]
    if missing:
        raise WeightsError(f"{folder / CONFIGS['model_index']} names no {', '.join(missing)}: not a TripoSG folder")
    parts = (("transformer", DiTConfig), ("vae", VAEConfig), ("image_encoder", Dinov2Config),
             ("feature_extractor", ImagePrep), ("scheduler", FlowConfig))
    made = {}
    for name, cls in parts:
        try:
            made[name] = cls.from_json_dict(raw[name])
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{folder / CONFIGS[name]} is not a config this TripoSG can run "
                               f"({type(e).__name__}: {e})") from e
    cfg = TripoSGConfig(made["transformer"], made["vae"], made["image_encoder"], made["feature_extractor"],
                        made["scheduler"])
    if cfg.dit.in_channels != cfg.vae.latent_channels or cfg.dit.cross_attention_dim != cfg.dino.hidden_size:
        raise WeightsError(f"{folder}: the transformer's in_channels / cross_attention_dim do not match the VAE's "
                           f"latent_channels / the image encoder's hidden_size")
    return cfg


class TripoSG(nn.Module):
    def __init__(self, cfg: TripoSGConfig, with_encoder: bool = False):
        super().__init__()
        self.cfg = cfg
        self.image_encoder_dinov2 = Dinov2(cfg.dino)
        self.transformer = TripoSGDiT(cfg.dit)
        self.vae = ShapeVAE(cfg.vae, with_encoder=with_encoder)
        self.num_tokens = NUM_TOKENS

    @property
    def device(self) -> torch.device:
        return self.transformer.proj_in.weight.device

    @torch.no_grad()
    def encode(self, rgb: np.ndarray, check=None) -> torch.Tensor:
        """The prepared image (H, W, 3) uint8 -> image tokens (1, T, D)."""
        return self.image_encoder_dinov2(self.cfg.prep(rgb).to(self.device), check)

    @torch.no_grad()
    def latents(self, tokens: torch.Tensor, steps: int, guidance: float, seed: int, on_step=None) -> torch.Tensor:
        """Image tokens -> the shape latents (1, N, C) float32. The noise is drawn on the CPU, so a seed gives
        the same shape on every device (the reference draws it on the pipeline's device)."""
        noise = torch.randn((1, self.num_tokens, self.cfg.dit.in_channels),
                            generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)
        return sample(self.transformer, noise.to(self.device), tokens, self.cfg.flow, steps, guidance, on_step)

    def make_planes(self, conditioning: np.ndarray, options, stages):
        """The prepared image -> the shape latents and what was used (the pipeline's "planes")."""
        steps = int(options.steps or STEPS)
        guidance = GUIDANCE if options.guidance is None else float(options.guidance)
        seed = SEED if options.seed is None else int(options.seed)
        dtype = devices.resolve_precision(options.precision, self.device, half="fp16")
        with devices.autocast(self.device, dtype):
            stages.begin(Stage.ENCODE, "encoding the image")
            tokens = self.encode(conditioning, stages.check)
            stages.begin(Stage.SHAPE, f"{steps} shape steps")
            latents = self.latents(tokens, steps, guidance, seed,
                                   lambda i, n: stages.update(i / n, f"shape step {i}/{n}"))
        return latents.float(), {"precision": devices.precision_name(dtype), "steps": steps, "guidance": guidance,
                                 "seed": seed}

    def reconstruct(self, conditioning, options, stages) -> Mesh:
        latents, used = self.make_planes(conditioning, options, stages)
        mesh = self.mesh_from(latents, options, stages)
        mesh.stats.update(used)
        return mesh

    def field(self, latents: torch.Tensor) -> "SDFField":
        return SDFField(self.vae, latents.to(self.device, torch.float32))

    def mesh_from(self, latents: torch.Tensor, options, stages) -> Mesh:
        r = int(options.resolution)
        stages.begin(Stage.SURFACE, f"surface at {r}³" + (" (dense)" if options.dense else ""))
        with torch.no_grad():
            vertices, faces = surface.marching_cubes(self.field(latents), r, 0.0, on_fraction=stages.update,
                                                     dense=options.dense)
        if len(faces) == 0:
            raise InputError("no surface found: the generated shape is empty",
                             hint="Try another seed, or an image with one clear object.")
        return Mesh(to_blender_frame(vertices), faces, np.full((len(vertices), 3), GREY, np.float32),
                    stats={"resolution": r, "surface": "SDF 0"})

    def colour_field(self, latents):
        return None  # no colour of its own: the post-processing paints the object grey


class SDFField:
    """The decoder's signed field (positive inside) as surface.py samples it: the level is the value itself
    (``signed``), zero on the surface, in the box [-BOX, BOX]³."""

    signed = True
    radius = BOX

    def __init__(self, vae: ShapeVAE, latents: torch.Tensor):
        self.vae = vae
        self.context = vae.context(latents)
        cfg = vae.cfg
        self.chunk = query_chunk(latents.device, cfg.width_decoder, cfg.num_attention_heads, latents.shape[1])

    @property
    def device(self) -> torch.device:
        return self.context.device

    def query(self, points: torch.Tensor) -> torch.Tensor:
        """points (N, 3) -> the field (N,) float32, in padded chunks."""
        out = []
        for part in points.split(self.chunk):
            n = len(part)
            pad = -n % QUERY_ROWS
            if pad:
                part = torch.cat([part, part.new_zeros((pad, 3))])
            out.append(self.vae.sdf(self.context, part.to(self.device, torch.float32)[None])[0, :n])
        return torch.cat(out) if out else self.context.new_zeros((0,))

    def grid_density_points(self, coords, xs, a, j, k) -> torch.Tensor:
        c = coords.to(self.device)
        return self.query(torch.stack([c[xs.to(self.device)[a.to(self.device)]], c[j.to(self.device)],
                                       c[k.to(self.device)]], dim=1))

    def grid_density_where(self, coords, xs, mask) -> torch.Tensor:
        a, j, k = torch.nonzero(mask.to(self.device), as_tuple=True)
        out = torch.full(mask.shape, float("nan"), device=self.device)
        out[a, j, k] = self.grid_density_points(coords, xs, a, j, k)
        return out


def query_chunk(device: torch.device, width: int, heads: int, tokens: int) -> int:
    """Decoder queries per call: a quarter of the free memory over what one query holds (its attention scores
    over every latent token, its activations, the MLP's 4× width, fp32), within [MIN_CHUNK, MAX_CHUNK]."""
    per_query = 4 * (2 * heads * tokens + 12 * width)
    free = _free_bytes(device)
    chunk = free // 4 // per_query
    return int(max(MIN_CHUNK, min(MAX_CHUNK, chunk // QUERY_ROWS * QUERY_ROWS)))


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return max(0, torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    try:
        import psutil
        return psutil.virtual_memory().available
    except ImportError:
        return 4 << 30


def to_blender_frame(v: np.ndarray) -> np.ndarray:
    """TripoSG's frame (+Y up, the front toward +Z, as its GLB files) -> Blender's (+Z up, front toward −Y):
    (x, y, z) -> (x, −z, y), a rotation, so the winding stays outward."""
    return np.stack([v[:, 0], -v[:, 2], v[:, 1]], axis=1)


def from_blender_frame(v: np.ndarray) -> np.ndarray:
    return np.stack([v[:, 0], v[:, 2], -v[:, 1]], axis=1)


def _file_layout(path: Path) -> dict:
    """{key: shape} of a safetensors file, read from its header only."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}",
                           hint="The folder must hold the files of VAST-AI/TripoSG: " + ", ".join(FILES))
    try:
        with safe_open(str(path), "pt") as f:
            layout = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path} could not be read as a safetensors file ({first_line(e, 200)})",
                           hint="The file is corrupt, incomplete or not the official one: download it again.") from e
    odd = [f"{k} is {t}" for k, (_, t) in layout.items() if t not in FLOAT_TYPES]
    if odd:
        raise WeightsError(f"{path} has tensors of an unexpected type: {', '.join(odd[:3])}")
    return {k: shape for k, (shape, _) in layout.items()}


def load(folder: Path, device: torch.device) -> TripoSG:
    """Every file's keys and shapes are checked before any weight is read: a folder that does not match
    raises WeightsError naming the file and the keys, and nothing is loaded."""
    from safetensors import safe_open

    folder = Path(folder)
    cfg = read_config(folder)
    with torch.device("meta"):
        full = TripoSG(cfg, with_encoder=True)  # the official VAE file holds the encoder too
    for part, rel in WEIGHTS.items():
        expected = {k: tuple(v.shape) for k, v in getattr(full, part).state_dict().items()}
        check_state_dict(expected, _file_layout(folder / rel), str(folder / rel))
    with torch.device("meta"):
        model = TripoSG(cfg)
    for part, rel in WEIGHTS.items():
        module = getattr(model, part)
        with safe_open(str(folder / rel), "pt") as f:
            state = {k: f.get_tensor(k).float() for k in f.keys() if not (part == "vae" and k.startswith(ENCODER_PREFIXES))}
        module.load_state_dict(state, strict=True, assign=True)
    model.vae.embedder = FourierEmbedding(cfg.vae.embed_frequency, cfg.vae.embed_include_pi)  # made on meta
    model = model.eval().requires_grad_(False)
    return model.to(device) if device.type != "cpu" else model

