"""TripoSR (stabilityai/TripoSR): DINO ViT-B/16 image tokens -> learned triplane tokens refined by a
transformer -> upsampled triplanes -> NeRF MLP density/colour -> marching cubes.

Loads the official folder unchanged: ``config.yaml`` + ``model.ckpt`` (transformers-4.35 key names).
Written from the reference (VAST-AI-Research/TripoSR, ``tsr/``); checked against its outputs in tests/data/triposr_tiny.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from .. import surface
from ..errors import WeightsError
from ..field import ColourField
from .single_image import SingleImageModel
from ..protocol import Stage
from ..mesh import Mesh
from .checkpoint import assign_weights, load_torch_file
from .transformer import Transformer1D
from .triplane import NeRFMLP, TriplaneField
from .vit import ViTConfig, ViTModel

CONFIG_FILE, WEIGHTS_FILE = "config.yaml", "model.ckpt"
# PRECISION_NOTE (TripoSR, OpenLRM, InstantMesh): only the encoder, the transformer and the upsampler run in the
# half type. Measured on the tiny fixtures (CPU): at the fp32 surface, TripoSR's density with the NeRF decoder too
# in bf16 is off by up to 12 % of the threshold, more than the whole transformer in bf16 gives (4.7 %), so the
# decoder, the surface and the colours stay fp32; an fp32 upsampler changed nothing measurable (it stays half).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Our copy of facebook/dino-vitb16/config.json (byte-identical), so that no download is ever needed.
BUNDLED_VIT_CONFIGS = {"facebook/dino-vitb16": Path(__file__).parent / "configs" / "dino-vitb16-config.json"}
# The reference's class paths: a config naming others is not a TripoSR config we know how to run.
EXPECTED_CLASSES = {
    "image_tokenizer_cls": "tsr.models.tokenizers.image.DINOSingleImageTokenizer",
    "tokenizer_cls": "tsr.models.tokenizers.triplane.Triplane1DTokenizer",
    "backbone_cls": "tsr.models.transformer.transformer_1d.Transformer1D",
    "post_processor_cls": "tsr.models.network_utils.TriplaneUpsampleNetwork",
    "decoder_cls": "tsr.models.network_utils.NeRFMLP",
    "renderer_cls": "tsr.models.nerf_renderer.TriplaneNeRFRenderer",
}


@dataclass
class TripoSRConfig:
    cond_image_size: int
    vit: ViTConfig
    plane_size: int
    num_channels: int
    backbone: dict
    post_out_channels: int
    decoder: dict
    radius: float
    density_bias: float


def _resolve_interpolations(cfg: dict) -> dict:
    """Expand OmegaConf-style ``${a.b}`` references, the only interpolation the official config uses."""

    def lookup(path: str):
        node = cfg
        for part in path.split("."):
            node = node[part]
        return node

    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, str):
            m = re.fullmatch(r"\$\{([\w.]+)\}", node.strip())
            if m:
                return lookup(m.group(1))
        return node

    return walk(cfg)


def read_config(folder: Path) -> TripoSRConfig:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise WeightsError(f"{CONFIG_FILE} not found in {folder}")
    try:
        raw = _resolve_interpolations(yaml.safe_load(path.read_text(encoding="utf-8")))
        for key, cls in EXPECTED_CLASSES.items():
            if raw.get(key) != cls:
                raise WeightsError(f"{path} is not a TripoSR config: {key} is {raw.get(key)!r}")
        renderer = raw["renderer"]
        if renderer.get("feature_reduction", "concat") != "concat" or \
                renderer.get("density_activation", "trunc_exp") not in ("exp", "trunc_exp"):
            raise WeightsError(f"{path}: unsupported renderer settings {renderer}")
        bb = raw["backbone"]
        if int(raw["post_processor"]["in_channels"]) != int(raw["tokenizer"]["num_channels"]):
            raise WeightsError(f"{path}: post_processor.in_channels differs from tokenizer.num_channels")
        return TripoSRConfig(
            cond_image_size=int(raw["cond_image_size"]),
            vit=_read_vit_config(folder, raw["image_tokenizer"]["pretrained_model_name_or_path"]),
            plane_size=int(raw["tokenizer"]["plane_size"]),
            num_channels=int(raw["tokenizer"]["num_channels"]),
            backbone={k: int(bb[k]) for k in ("in_channels", "num_attention_heads", "attention_head_dim",
                                              "num_layers", "cross_attention_dim")},
            post_out_channels=int(raw["post_processor"]["out_channels"]),
            decoder=dict(in_channels=int(raw["decoder"]["in_channels"]), n_neurons=int(raw["decoder"]["n_neurons"]),
                         n_hidden_layers=int(raw["decoder"]["n_hidden_layers"]),
                         activation=raw["decoder"].get("activation", "relu")),
            radius=float(renderer["radius"]),
            density_bias=float(renderer.get("density_bias", -1.0)),
        )
    except WeightsError:
        raise
    except (yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise WeightsError(f"{path} is not a valid TripoSR config ({type(e).__name__}: {e})") from e


def _read_vit_config(folder: Path, name: str) -> ViTConfig:
    local = folder / name / "config.json"
    path = local if local.is_file() else BUNDLED_VIT_CONFIGS.get(name)
    if path is None:
        raise WeightsError(f"the image encoder {name!r} named in {CONFIG_FILE} is unknown",
                           hint=f"Put its config.json at {local}.")
    try:
        return ViTConfig.from_json_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{path} is not a valid ViT config ({e})") from e


class _ImageTokenizer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.model = ViTModel(cfg)


class _TriplaneTokens(nn.Module):
    def __init__(self, plane_size: int, channels: int):
        super().__init__()
        self.embeddings = nn.Parameter(torch.zeros(3, channels, plane_size, plane_size))


class _Upsampler(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)


class TripoSR(SingleImageModel, nn.Module):
    conditioning_camera = "triposr"  # postprocess/cameras.py: the picture's camera, for painting

    def __init__(self, cfg: TripoSRConfig):
        super().__init__()
        self.cfg = cfg
        self.image_tokenizer = _ImageTokenizer(cfg.vit)
        self.tokenizer = _TriplaneTokens(cfg.plane_size, cfg.num_channels)
        self.backbone = Transformer1D(**cfg.backbone)
        self.post_processor = _Upsampler(cfg.num_channels, cfg.post_out_channels)
        self.decoder = NeRFMLP(**cfg.decoder)

    @property
    def device(self) -> torch.device:
        return self.tokenizer.embeddings.device

    @torch.no_grad()
    def encode(self, rgb: torch.Tensor, check=None) -> torch.Tensor:
        """rgb (B, S, S, 3) in [0, 1] -> image tokens (B, 1 + patches, C), CLS included."""
        x = rgb.permute(0, 3, 1, 2).to(self.device)
        mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return self.image_tokenizer.model((x - mean) / std, check)

    @torch.no_grad()
    def triplanes(self, image_tokens: torch.Tensor, check=None) -> torch.Tensor:
        """image tokens -> triplanes (B, 3, C_out, 2P, 2P)."""
        b = image_tokens.shape[0]
        emb = self.tokenizer.embeddings  # (3, C, P, P)
        _, c, p, _ = emb.shape
        tokens = emb.permute(1, 0, 2, 3).reshape(1, c, 3 * p * p).expand(b, -1, -1)
        out = self.backbone(tokens, image_tokens, check)
        planes = out.reshape(b, c, 3, p, p).permute(0, 2, 1, 3, 4).reshape(b * 3, c, p, p)
        planes = self.post_processor.upsample(planes)
        return planes.reshape(b, 3, *planes.shape[1:])

    def field(self, planes: torch.Tensor) -> TriplaneField:
        """The density/colour field of one object, planes (3, C, H, W)."""
        return TriplaneField(planes, self.decoder.layers, self.cfg.radius, self.cfg.density_bias)

    def model_input(self, conditioning: np.ndarray, options):
        """The prepared image as this model's encoder takes it, and the source size used."""
        from .. import preprocess
        from ..options import check_source_size

        size = check_source_size(int(options.source_size or self.cfg.cond_image_size), self.cfg.vit.patch_size)
        return preprocess.to_model_input(conditioning, size), size

    def planes_of(self, rgb, stages) -> torch.Tensor:
        stages.begin(Stage.ENCODE, "encoding the image")
        tokens = self.encode(rgb, stages.check)
        stages.begin(Stage.TRIPLANE, "building triplanes")
        return self.triplanes(tokens, stages.check)[0]

    def mesh_from(self, planes: torch.Tensor, options, stages) -> Mesh:
        vertices, faces, colors = surface.colored_surface(self.field(planes), int(options.resolution),
                                                          float(options.threshold), stages, dense=options.dense)
        return Mesh(to_blender_frame(vertices), faces, colors,
                    stats={"threshold": float(options.threshold), "resolution": int(options.resolution)})

    def colour_field(self, planes: torch.Tensor) -> ColourField:
        field = self.field(planes.to(self.device))
        return ColourField(lambda p: field.query(p)[1], from_blender_frame, self.device)


def to_blender_frame(v: np.ndarray) -> np.ndarray:
    """TripoSR's frame (+X toward the camera, +Y image right, +Z up) -> Blender's (front view along +Y):
    (x, y, z) -> (y, -x, z), a rotation, so the winding stays outward."""
    return np.stack([v[:, 1], -v[:, 0], v[:, 2]], axis=1)


def from_blender_frame(v: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_blender_frame`: (x, y, z) -> (-y, x, z)."""
    return np.stack([-v[:, 1], v[:, 0], v[:, 2]], axis=1)


def load(folder: Path, device: torch.device) -> TripoSR:
    folder = Path(folder)
    cfg = read_config(folder)
    with torch.device("meta"):
        model = TripoSR(cfg)
    state = load_torch_file(folder / WEIGHTS_FILE)
    model = assign_weights(model, state, f"{folder / WEIGHTS_FILE}")
    return model.to(device) if device.type != "cpu" else model
