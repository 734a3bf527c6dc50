"""Make the tiny TripoSG fixture: random weights in the official folder layout (VAST-AI/TripoSG: model_index.json,
transformer/, vae/, image_encoder_dinov2/, feature_extractor_dinov2/, scheduler/), written by the reference's own
classes and ``save_pretrained``, and the reference's outputs on them (expected.npz).

Needs the reference checkout (VAST-AI-Research/TripoSG) and diffusers + transformers; never run by the tests, which
read what it wrote. The reference is imported here only, with what it imports for its CUDA extraction (``diso``,
through ``triposg.inference_utils``) and for training (einops, jaxtyping) stubbed out: the shape is recorded as the
decoder's SDF on a dense grid, triangulated by the tests.

    python tests/data/triposg_tiny/make_tiny.py /path/to/TripoSG-checkout
"""

import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
MODEL = HERE / "model"
STEPS = 3
GUIDANCE = 3.5
RUNS = {"cfg_seed0": (0, GUIDANCE), "cfg_seed1": (1, GUIDANCE), "nocfg_seed0": (0, 1.0)}
GRIDS = (32, 48)  # dense-grid resolutions (points per axis) in the reference's box
BOX = 1.005


def _stub_reference_imports():
    einops = types.ModuleType("einops")
    einops.rearrange = einops.repeat = None  # used by the flash decoder and training paths only
    sys.modules["einops"] = einops
    utils = types.ModuleType("triposg.inference_utils")
    utils.hierarchical_extract_geometry = lambda *a, **k: [(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64))]
    utils.flash_extract_geometry = utils.hierarchical_extract_geometry
    sys.modules["triposg.inference_utils"] = utils


def _randomise(module, std, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if name.endswith(("norm1.weight", "norm2.weight", "norm3.weight", "norm_q.weight", "norm_k.weight",
                              "layernorm.weight", "norm_out.weight", "skip_norm.weight", "norm_cross.weight",
                              "lambda1")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def _blob(vae):
    """One rounded object in the middle of the box rather than random folds: a strong direction u of the decoder's
    query stream follows cos(πx) + cos(πy) + cos(πz) (the embedding's first cosines), and the output reads it,
    so the field is about that sum less a constant, with the random layers' detail on top."""
    g = torch.Generator().manual_seed(4)
    d = vae.decoder
    width = d.proj_query.weight.shape[0]
    u = torch.randn(width, generator=g)
    u = (u - u.mean()) / (u - u.mean()).norm()
    n = vae.config.embed_frequency
    cos_pi = [3 + 3 * n + i * n for i in range(3)]  # [p, sin(p·f), cos(p·f)], frequencies inner per coordinate
    with torch.no_grad():
        d.proj_query.weight[:, cos_pi] += 3.0 * u[:, None]
        d.proj_out.weight.copy_(-2.0 * u[None] + 0.05 * torch.randn(d.proj_out.weight.shape, generator=g))
        d.proj_out.bias.fill_(-0.6)


def make(reference: Path):
    sys.path.insert(0, str(reference))
    _stub_reference_imports()
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from triposg.models.autoencoders import TripoSGVAEModel
    from triposg.models.transformers import TripoSGDiTModel
    from triposg.pipelines.pipeline_triposg import TripoSGPipeline
    from triposg.schedulers import RectifiedFlowScheduler

    torch.manual_seed(0)
    dino = Dinov2Model(Dinov2Config(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=2,
                                    image_size=70, patch_size=14, layerscale_value=0.5))
    _randomise(dino, 0.2, 1)
    extractor = BitImageProcessor(do_resize=True, size={"shortest_edge": 64}, resample=3, do_center_crop=True,
                                  crop_size={"height": 56, "width": 56}, do_rescale=True, rescale_factor=1 / 255,
                                  do_normalize=True, image_mean=[0.485, 0.456, 0.406],
                                  image_std=[0.229, 0.224, 0.225], do_convert_rgb=True)
    dit = TripoSGDiTModel(num_attention_heads=2, width=32, in_channels=8, num_layers=5, cross_attention_dim=24)
    _randomise(dit, 0.15, 2)
    vae = TripoSGVAEModel(in_channels=3, latent_channels=8, num_attention_heads=2, width_encoder=16, width_decoder=32,
                          num_layers_encoder=1, num_layers_decoder=2, embed_frequency=2, embed_include_pi=True)
    _randomise(vae, 0.08, 3)
    _blob(vae)
    scheduler = RectifiedFlowScheduler(num_train_timesteps=1000, shift=2.0, use_dynamic_shifting=False)
    pipe = TripoSGPipeline(vae=vae, transformer=dit, scheduler=scheduler, image_encoder_dinov2=dino,
                           feature_extractor_dinov2=extractor)
    pipe.save_pretrained(MODEL, safe_serialization=True)
    return TripoSGPipeline.from_pretrained(MODEL).to("cpu", torch.float32)


def conditioning_image():
    """A 72×60 RGB picture on white (the reference's preprocessing output is any size; the extractor squares it)."""
    from PIL import Image
    y, x = np.mgrid[0:60, 0:72]
    rgb = np.full((60, 72, 3), 255, np.uint8)
    inside = (x - 36) ** 2 / 26 ** 2 + (y - 30) ** 2 / 22 ** 2 < 1
    rgb[inside] = np.stack([(x * 3) % 256, (y * 4) % 256, (x + y) % 256], -1)[inside]
    return Image.fromarray(rgb)


def record(pipe):
    image = conditioning_image()
    image.save(HERE / "conditioning.png")
    out = {}
    with torch.no_grad():
        pixels = pipe.feature_extractor_dinov2(image, return_tensors="pt").pixel_values
        out["pixel_values"] = pixels.numpy()
        embeds, _ = pipe.encode_image(image, "cpu", 1)
        out["image_embeds"] = embeds.numpy()
        for name, (seed, guidance) in RUNS.items():
            seen = {}

            def keep(p, i, t, kw, seen=seen):
                seen.setdefault("latents", []).append(kw["latents"].clone())
                return {}

            pipe(image=image, num_inference_steps=STEPS, guidance_scale=guidance,
                 generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=keep,
                 use_flash_decoder=False)
            out[f"latents_{name}"] = torch.stack(seen["latents"])[:, 0].numpy()  # after each step
        latents = torch.from_numpy(out["latents_cfg_seed0"][-1])[None]
        points = torch.from_numpy(np.random.default_rng(0).uniform(-BOX, BOX, (1, 2000, 3)).astype(np.float32))
        out["query_points"] = points[0].numpy()
        out["query_sdf"] = pipe.vae.decode(latents, sampled_points=points).sample[0, :, 0].numpy()
        for r in GRIDS:
            axis = torch.linspace(0, 1, r) * (2 * BOX) - BOX
            grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(1, -1, 3)
            out[f"grid_sdf_{r}"] = pipe.vae.decode(latents, sampled_points=grid).sample.reshape(r, r, r).numpy()
    np.savez_compressed(HERE / "expected.npz", **out)
    meta = {"steps": STEPS, "runs": {k: {"seed": s, "guidance": g} for k, (s, g) in RUNS.items()},
            "grids": list(GRIDS), "box": BOX, "num_tokens": 2048,
            "torch": torch.__version__, "note": "reference pipeline on CPU, fp32; grid_sdf_R on linspace(-box, box, R)"}
    (HERE / "expected_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    for r in GRIDS:
        g = out[f"grid_sdf_{r}"]
        print(r, "inside fraction", float((g > 0).mean()), "range", float(g.min()), float(g.max()))


def manifest(reference: Path):
    """Keys and shapes of the three weight files at the reference's default sizes (DiT 2048 wide, 21 layers; VAE
    512/1024 wide, 8/16 layers; DINOv2-L/14): the layout of the official files, as far as the reference's defaults
    are the official configs' (the hub was out of reach when this was written)."""
    sys.path.insert(0, str(reference))
    _stub_reference_imports()
    from transformers import Dinov2Config, Dinov2Model

    from triposg.models.autoencoders import TripoSGVAEModel
    from triposg.models.transformers import TripoSGDiTModel

    with torch.device("meta"):
        parts = {"transformer": TripoSGDiTModel(), "vae": TripoSGVAEModel(),
                 "image_encoder_dinov2": Dinov2Model(Dinov2Config(hidden_size=1024, num_hidden_layers=24,
                                                                  num_attention_heads=16, image_size=518,
                                                                  patch_size=14))}
    out = {name: {k: list(v.shape) for k, v in m.state_dict().items()} for name, m in parts.items()}
    # transformers 5 names DINOv2's projections q_proj...o_proj in memory; save_pretrained writes (and the official
    # file, saved by transformers 4, has) the names below, as model/image_encoder_dinov2/model.safetensors shows
    legacy = {"attention.q_proj.": "attention.attention.query.", "attention.k_proj.": "attention.attention.key.",
              "attention.v_proj.": "attention.attention.value.", "attention.o_proj.": "attention.output.dense."}
    renamed = {}
    for k, v in out["image_encoder_dinov2"].items():
        for old, new in legacy.items():
            k = k.replace(old, new)
        renamed[k] = v
    out["image_encoder_dinov2"] = renamed
    out["total_parameters"] = {name: sum(int(np.prod(s)) for s in keys.values()) for name, keys in out.items()}
    (HERE.parent / "triposg_state_dict_manifest.json").write_text(json.dumps(out, indent=0, sort_keys=True) + "\n")
    print(out["total_parameters"])


if __name__ == "__main__":
    record(make(Path(sys.argv[1])))
    manifest(Path(sys.argv[1]))
