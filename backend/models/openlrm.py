"""OpenLRM v1.1 (zxhezexin/openlrm-{obj,mix}-{small,base,large}-1.1): DINOv2-with-registers image features
and a fixed source camera -> learned triplane tokens refined by a camera-modulated transformer -> ×2
upsampled triplanes -> MLP density/colour -> marching cubes.

Loads the official folder unchanged: ``config.json`` (the model's constructor arguments) +
``model.safetensors`` (every weight, the encoder's included), strictly: every key, shape and dtype.
Written from the reference (3DTopia/OpenLRM); checked against its outputs in tests/data/openlrm_tiny.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .. import surface
from ..errors import WeightsError
from ..field import ColourField
from .single_image import SingleImageModel
from ..protocol import Stage
from ..mesh import Mesh, truncate_to_bytes
from .checkpoint import assign_weights, load_safetensors_file, named
from .dinov2 import KNOWN_BACKBONES, DinoV2, DinoV2Config
from .lrm_transformer import TransformerDecoder, upsample_triplanes
from .triplane import EG3D_PLANE_AXES, TriplaneField, mlp_layers

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
# A backbone not among DINOv2's named ones (OpenLRM's test models) is described by a side file
# in the model folder, e.g. tiny_encoder_arch.json, whose "encoder_model_name" is the config's name.
ENCODER_ARCH_GLOB = "*encoder_arch.json"
CONFIG_KEYS = {"camera_embed_dim", "rendering_samples_per_ray", "transformer_dim", "transformer_layers",
               "transformer_heads", "triplane_low_res", "triplane_high_res", "triplane_dim", "encoder_type",
               "encoder_model_name", "encoder_feat_dim", "encoder_freeze"}
# The triplanes span [-1, 1]³ in the world frame of the training renders.
RADIUS = 1.0
DECODER_WIDTH, DECODER_HIDDEN_LAYERS = 64, 3
SOURCE_CAMERA_DISTANCE = 2.0
FOCAL, PRINCIPAL_POINT = 0.75, 0.5  # normalised by the image size


@dataclass(frozen=True)
class OpenLRMConfig:
    camera_embed_dim: int
    transformer_dim: int
    transformer_layers: int
    transformer_heads: int
    triplane_low_res: int
    triplane_dim: int
    encoder: DinoV2Config


def read_config(folder: Path) -> OpenLRMConfig:
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise WeightsError(f"{CONFIG_FILE} not found in {folder}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        missing, unknown = CONFIG_KEYS - raw.keys(), raw.keys() - CONFIG_KEYS
        if missing or unknown:
            raise WeightsError(f"{path} is not an OpenLRM 1.1 config: "
                               + "; ".join(f"{label} {sorted(keys)}" for label, keys in
                                           (("missing", missing), ("unknown", unknown)) if keys))
        if raw["encoder_type"] != "dinov2":
            raise WeightsError(f"{path}: encoder_type {raw['encoder_type']!r} is not supported "
                               f"(OpenLRM 1.1 uses dinov2)")
        encoder = _encoder_arch(folder, raw["encoder_model_name"])
        if int(raw["encoder_feat_dim"]) != encoder.embed_dim:
            raise WeightsError(f"{path}: encoder_feat_dim {raw['encoder_feat_dim']} differs from the width "
                               f"{encoder.embed_dim} of {raw['encoder_model_name']}")
        cfg = OpenLRMConfig(encoder=encoder, **{k: int(raw[k]) for k in (
            "camera_embed_dim", "transformer_dim", "transformer_layers", "transformer_heads", "triplane_low_res",
            "triplane_dim")})
        if cfg.transformer_dim % cfg.transformer_heads:
            raise WeightsError(f"{path}: transformer_dim is not a multiple of transformer_heads")
        return cfg
    except WeightsError:
        raise
    except (ValueError, TypeError, KeyError) as e:  # json.JSONDecodeError is a ValueError
        raise WeightsError(f"{path} is not a valid OpenLRM config ({type(e).__name__}: {e})") from e


def _encoder_arch(folder: Path, name: str) -> DinoV2Config:
    if name in KNOWN_BACKBONES:
        return KNOWN_BACKBONES[name]
    for path in sorted(folder.glob(ENCODER_ARCH_GLOB)):
        try:
            arch = json.loads(path.read_text(encoding="utf-8"))
            if arch.get("encoder_model_name") == name:
                return DinoV2Config.from_arch_dict(arch)
        except (ValueError, TypeError, AttributeError) as e:
            raise WeightsError(f"{path} is not a valid encoder description ({e})") from e
    raise WeightsError(f"the image encoder {name!r} named in {CONFIG_FILE} is unknown",
                       hint=f"OpenLRM 1.1 uses {' or '.join(KNOWN_BACKBONES)}; another backbone needs a side file "
                            f"{ENCODER_ARCH_GLOB} in the model folder naming it.")


def source_camera(distance: float = SOURCE_CAMERA_DISTANCE) -> torch.Tensor:
    """The fixed input camera (1, 16): cam2world ``[R|t]`` row-major, then fx, fy, cx, cy.

    The camera sits at (0, -distance, 0), looks along +Y with +Z up and +X to its right: Blender's
    Front view. So the model's world frame is already Blender's and meshes need no change of frame.
    """
    pose = [[1.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, -1.0, -distance],
            [0.0, 1.0, 0.0, 0.0]]
    return torch.tensor([sum(pose, []) + [FOCAL, FOCAL, PRINCIPAL_POINT, PRINCIPAL_POINT]], dtype=torch.float32)


class OpenLRM(SingleImageModel, nn.Module):
    conditioning_camera = "openlrm"  # postprocess/cameras.py: the picture's camera, for painting

    def __init__(self, cfg: OpenLRMConfig, default_source_size: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        # Not in config.json: the reference's inference configs give it per size (224/336/448).
        self.default_source_size = default_source_size
        dim, cam = cfg.transformer_dim, cfg.camera_embed_dim
        # Registered in the checkpoint's order.
        self.pos_embed = nn.Parameter(torch.randn(1, 3 * cfg.triplane_low_res ** 2, dim) * dim ** -0.5)
        self.encoder = named(model=DinoV2(cfg.encoder))
        self.camera_embedder = named(mlp=nn.Sequential(nn.Linear(16, cam), nn.SiLU(), nn.Linear(cam, cam)))
        self.transformer = TransformerDecoder(dim, cfg.transformer_layers, cfg.transformer_heads,
                                              cond_dim=cfg.encoder.embed_dim, mod_dim=cam)
        self.upsampler = nn.ConvTranspose2d(dim, cfg.triplane_dim, kernel_size=2, stride=2)
        self.synthesizer = named(decoder=named(net=mlp_layers(
            3 * cfg.triplane_dim, DECODER_WIDTH, DECODER_HIDDEN_LAYERS, activation="relu")))

    @property
    def device(self) -> torch.device:
        return self.pos_embed.device

    @property
    def patch_size(self) -> int:
        return self.cfg.encoder.patch_size

    @torch.no_grad()
    def encode(self, image: torch.Tensor, check=None) -> torch.Tensor:
        """image (B, 3, S, S) in [0, 1], no normalisation -> features (B, 1 + (S/14)², C_enc)."""
        return self.encoder.model(image.to(self.device), check)

    @torch.no_grad()
    def embed_camera(self, camera: torch.Tensor) -> torch.Tensor:
        return self.camera_embedder.mlp(camera.to(self.device))

    @torch.no_grad()
    def transform(self, image_features: torch.Tensor, camera_embedding: torch.Tensor, check=None) -> torch.Tensor:
        """-> triplane tokens (B, 3·P·P, D), token index = plane·P² + row·P + column."""
        tokens = self.pos_embed.expand(image_features.shape[0], -1, -1)
        return self.transformer(tokens, image_features, camera_embedding, check)

    @torch.no_grad()
    def upsample(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, 3·P·P, D) -> triplanes (B, 3, C, 2P, 2P)."""
        return upsample_triplanes(self.upsampler, tokens, self.cfg.triplane_low_res)

    def field(self, planes: torch.Tensor) -> TriplaneField:
        """The density/colour field of one object, planes (3, C, H, W): EG3D's plane axes, density
        softplus(raw − 1), colour sigmoid widened by 0.001 on both sides (MipNeRF)."""
        return TriplaneField(planes, self.synthesizer.decoder.net, RADIUS, density_bias=-1.0,
                             plane_axes=EG3D_PLANE_AXES, density_activation="softplus", color_margin=0.001)

    def model_input(self, conditioning: np.ndarray, options):
        """The prepared image as this model's encoder takes it, and the source size used."""
        from .. import preprocess
        from ..options import check_source_size

        size = options.source_size or self.default_source_size
        if size is None:
            raise ValueError("no source size: set options.source_size or load the model with a default")
        size = check_source_size(int(size), self.patch_size)
        return preprocess.to_openlrm_input(conditioning, size), size

    def planes_of(self, image, stages) -> torch.Tensor:
        stages.begin(Stage.ENCODE, "encoding the image")
        features = self.encode(image, stages.check)
        stages.begin(Stage.TRIPLANE, "building triplanes")
        camera = self.embed_camera(source_camera())
        return self.upsample(self.transform(features, camera, stages.check))[0]

    def mesh_from(self, planes: torch.Tensor, options, stages) -> Mesh:
        vertices, faces, colors = surface.colored_surface(self.field(planes), int(options.resolution),
                                                          float(options.threshold), stages, dense=options.dense)
        return Mesh(vertices, faces, truncate_to_bytes(colors),
                    stats={"threshold": float(options.threshold), "resolution": int(options.resolution)})

    def colour_field(self, planes: torch.Tensor) -> ColourField:
        """OpenLRM's frame is Blender's; colours truncated to bytes, as its vertex colours are."""
        field = self.field(planes.to(self.device))
        return ColourField(lambda p: field.query(p)[1], lambda v: v, self.device, finish=truncate_to_bytes)


def load(folder: Path, device: torch.device, default_source_size: Optional[int] = None) -> OpenLRM:
    folder = Path(folder)
    cfg = read_config(folder)
    with torch.device("meta"):
        model = OpenLRM(cfg, default_source_size)
    state = load_safetensors_file(folder / WEIGHTS_FILE)
    model = assign_weights(model, state, f"{folder / WEIGHTS_FILE}")
    return model.to(device) if device.type != "cpu" else model
