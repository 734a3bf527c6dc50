"""What each model is, which files it needs (pinned revision, size, sha256), where they are looked for,
and loading it (with a warm cache).

A model folder is looked for in this order: a folder the user names (``--weights``; used as given, the
user vouches for it), the model's folder in the model store (``IMAGE_TO_3D_MODELS``, which Blender points at
the extension's user folder: ``<store>/<id>/``, real files left by an earlier version or links into the cache),
then the Hugging Face cache at the pinned revisions (where downloads go: ``hub.hub_cache()``), then any other
revision there. Standard library only: Blender imports this module for its model list and download sizes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import InputError, WeightsError
from ..hub import RemoteFile, cached, default_store, hub_cache, human_size, repo_folder, snapshot_of
from ..options import FOREGROUND_RATIO


@dataclass(frozen=True)
class ModelSpec:
    id: str
    display_name: str
    repo: str
    files: tuple  # RemoteFile records, pinned
    licence: str  # SPDX id of the weights' licence
    default_resolution: int
    default_threshold: Optional[float]  # None: the surface is a level the model fixes (InstantMesh's SDF 0)
    loader: Callable  # (folder, device) -> model with .make_planes(), .mesh_from(), .colour_field()
    # Side of the square image the encoder sees, for display: the model applies it (TripoSR reads it from
    # its config, OpenLRM's loader is given it) unless Options.source_size says otherwise.
    default_source_size: Optional[int] = None
    preprocessing: str = "triposr"  # recipe in ..preprocess
    patch_size: int = 16  # the encoder's patch: a source size must be a multiple of it
    # SINGLE: one image -> mesh (``.reconstruct``). MULTIVIEW: a diffusion model draws six views first, then a
    # sparse-view LRM meshes them (``.load_views_model``, ``.generate_views``, ``.planes_from_views``).
    kind: str = "single"
    # MULTIVIEW: the files the second stage needs alone (ready-made views, ``--views``); None = all of them.
    views_stage_files: Optional[tuple] = None
    sampled: bool = False  # a diffusion model draws the shape (--steps, --guidance, --seed apply): TripoSG
    resolutions: Optional[tuple] = None  # the grid sizes the model takes; None = any within the limits

    @property
    def multiview(self) -> bool:
        return self.kind == MULTIVIEW

    @property
    def default_foreground_ratio(self) -> float:
        return FOREGROUND_RATIO[self.preprocessing]

    @property
    def file_names(self) -> tuple:
        return tuple(f.path for f in self.files)

    @property
    def download_size(self) -> Optional[int]:
        sizes = [f.size for f in self.files]
        return None if None in sizes else sum(sizes)


SINGLE, MULTIVIEW = "single", "multiview"


def approx_size(files) -> int:
    """For display only: exact sizes where known, the spec's estimates (APPROX_BYTES) for the others."""
    return sum(f.size or APPROX_BYTES.get((f.repo, f.path), 0) for f in files)


def _load_triposr(folder, device):
    from . import triposr

    return triposr.load(folder, device)


def _openlrm_loader(source_size: int):
    def load(folder, device):
        from . import openlrm

        return openlrm.load(folder, device, default_source_size=source_size)

    return load


def _instantmesh_loader(size: str, variant: str):
    def load(folder, device):
        from . import instantmesh_pipeline

        return instantmesh_pipeline.InstantMeshPipeline(folder, device, size, variant)

    return load


# How much of the frame the object fills, per preprocessing recipe (OpenLRM: a border ratio of 0.2).

TRIPOSR_REVISION = "5b521936b01fbe1890f6f9baed0254ab6351c04a"

# OpenLRM v1.1, zxhezexin/openlrm-{obj,mix}-{size}-1.1: "obj" trained on Objaverse, "mix" on Objaverse +
# MVImgNet; one architecture per size. Written without access to the hub: the revision is not pinned yet
# and the model.safetensors sizes are the spec's prediction from the exact parameter counts (float32,
# 2024-era safetensors header); the sha256 is recorded on first download. Pin all three once seen.
OPENLRM_REVISION = "main"
OPENLRM_SIZES = {"small": (224, 445_613_160), "base": (336, 1_040_854_744), "large": (448, 1_808_612_240)}


def _openlrm_specs():
    for data in ("obj", "mix"):
        for size, (source_size, weight_bytes) in OPENLRM_SIZES.items():
            repo = f"zxhezexin/openlrm-{data}-{size}-1.1"
            yield ModelSpec(
                f"openlrm-{data}-{size}", f"OpenLRM {size.title()} ({data})", repo,
                (RemoteFile(repo, OPENLRM_REVISION, "config.json"),
                 RemoteFile(repo, OPENLRM_REVISION, "model.safetensors", weight_bytes)),
                "CC-BY-NC-4.0", 384, 3.0, _openlrm_loader(source_size), default_source_size=source_size,
                preprocessing="openlrm", patch_size=14)


# InstantMesh (spec instantmesh.md): stage 1 is Zero123++ v1.2 (sudo-ai/zero123plus-v1.2) with InstantMesh's
# fine-tuned UNet, stage 2 the sparse-view LRM (TencentARC/InstantMesh). One model folder holds both: the
# Zero123++ files at their repository paths, InstantMesh's files at its root. Zero123++'s own UNet weights
# (3.46 GB) are not needed: InstantMesh's replaces them, only unet/config.json is read. Revisions are not
# pinned yet ("main"). InstantMesh's three files carry the size and sha256 of their LFS pointers (the spec's
# manifests, tests/data/instantmesh_state_dict_manifest_*.json, zero123plus_unet_state_dict_manifest.json);
# the Zero123++ files have none yet: their sha256 is recorded on first download. Pin the revisions once seen.
# Licence: the Zero123++ v1.2 weights, from which the fine-tuned UNet derives, are CC-BY-NC-4.0 (§2.8).
# The stage-2 architecture (configs/instant-mesh-*.yaml of the GitHub repository, not on the hub) is bundled
# as configs/instant-mesh-*.yaml; a YAML config in the model folder takes its place.
ZERO123PP_REPO, ZERO123PP_REVISION = "sudo-ai/zero123plus-v1.2", "main"
INSTANTMESH_REPO, INSTANTMESH_REVISION = "TencentARC/InstantMesh", "main"
ZERO123PP_FILES = (
    "model_index.json", "unet/config.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json", "vision_encoder/config.json",
    "vision_encoder/model.safetensors", "feature_extractor_clip/preprocessor_config.json",
    "feature_extractor_vae/preprocessor_config.json", "scheduler/scheduler_config.json")
# Sizes with no published record yet (spec instantmesh.md §1.1, fp16 files): shown to the user, never checked.
APPROX_BYTES = {(ZERO123PP_REPO, "vae/diffusion_pytorch_model.safetensors"): 167_000_000,
                (ZERO123PP_REPO, "text_encoder/model.safetensors"): 681_000_000,
                (ZERO123PP_REPO, "vision_encoder/model.safetensors"): 1_264_000_000}
INSTANTMESH_UNET = RemoteFile(INSTANTMESH_REPO, INSTANTMESH_REVISION, "diffusion_pytorch_model.bin", 1_732_056_502,
                              "9d78d78421d1feb6871d13e13e86ed8099628648d7d9c51ffca9015b7d5fa3c4")
# instant_{variant}_{size}.ckpt: bytes, sha256. "mesh": FlexiCubes at SDF 0, grid 128; "nerf": marching cubes
# on density at 10, grid 256 (the same encoder and transformer, another decoder).
INSTANTMESH_CHECKPOINTS = {
    ("mesh", "large"): (1_514_818_077, "329f7aae9b583fd7c1b27d0221463db7b808a03c48a1f7aa26649af6a03b91a1"),
    ("mesh", "base"): (1_253_574_354, "22701cd25201d624ebb1568b93cf91b43a2c32006835c08fe73e1f3c9f6c44b5"),
    ("nerf", "large"): (1_514_088_389, "530a344ea9b856e012492b9644ab73532ddf7c06d548f60c489e49a528322fb9"),
    ("nerf", "base"): (1_253_151_890, "bcbfff8be8545f8206110f432afddedfb4311abc1146b843ab2bdb6678f8d9c9"),
}


def _instantmesh_specs():
    views = tuple(RemoteFile(ZERO123PP_REPO, ZERO123PP_REVISION, path) for path in ZERO123PP_FILES)
    for (variant, size), (ckpt_bytes, sha256) in INSTANTMESH_CHECKPOINTS.items():
        ckpt = RemoteFile(INSTANTMESH_REPO, INSTANTMESH_REVISION, f"instant_{variant}_{size}.ckpt", ckpt_bytes, sha256)
        mesh = variant == "mesh"
        yield ModelSpec(
            f"instant{variant}-{size}", f"InstantMesh {size.title()}" if mesh else f"InstantNeRF {size.title()}",
            INSTANTMESH_REPO, (ckpt, INSTANTMESH_UNET, *views), "CC-BY-NC-4.0", 128 if mesh else 256,
            None if mesh else 10.0, _instantmesh_loader(size, variant), preprocessing="instantmesh", kind=MULTIVIEW,
            views_stage_files=(ckpt.path,))


# TripoSG (VAST-AI/TripoSG, MIT): the official diffusers folder, read unchanged. Written without access to the
# hub: the revision is not pinned and no size or sha256 is known yet (recorded on first download, as above); the
# estimates are the parameter counts of the reference's default sizes (tests/data/triposg_state_dict_manifest.json)
# in float16 for the DiT and the VAE, float32 for DINOv2-L, shown to the user only. Pin them once seen.
TRIPOSG_REPO, TRIPOSG_REVISION = "VAST-AI/TripoSG", "main"
TRIPOSG_FILES = (
    "model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "image_encoder_dinov2/config.json",
    "image_encoder_dinov2/model.safetensors", "feature_extractor_dinov2/preprocessor_config.json",
    "scheduler/scheduler_config.json")
APPROX_BYTES.update({(TRIPOSG_REPO, "transformer/diffusion_pytorch_model.safetensors"): 2_879_000_000,
                     (TRIPOSG_REPO, "vae/diffusion_pytorch_model.safetensors"): 485_000_000,
                     (TRIPOSG_REPO, "image_encoder_dinov2/model.safetensors"): 1_217_000_000})


def _load_triposg(folder, device):
    from . import triposg

    return triposg.load(folder, device)


MODELS = {
    spec.id: spec
    for spec in (
        ModelSpec(
            "triposr", "TripoSR", "stabilityai/TripoSR",
            (RemoteFile("stabilityai/TripoSR", TRIPOSR_REVISION, "config.yaml", 987,
                        "74ca708ce086bf68e97709ea6b3d91f14717921c04691e84043f0eb8fcc68e62"),
             RemoteFile("stabilityai/TripoSR", TRIPOSR_REVISION, "model.ckpt", 1_677_246_742,
                        "429e2c6b22a0923967459de24d67f05962b235f79cde6b032aa7ed2ffcd970ee")),
            "MIT", 256, 25.0, _load_triposr, default_source_size=512),
        ModelSpec("triposg", "TripoSG", TRIPOSG_REPO,
                  tuple(RemoteFile(TRIPOSG_REPO, TRIPOSG_REVISION, path) for path in TRIPOSG_FILES), "MIT", 512, None,
                  _load_triposg, preprocessing="triposg", patch_size=14, sampled=True,
                  resolutions=(128, 256, 512, 1024)),
        *_openlrm_specs(),
        *_instantmesh_specs(),
    )
}
# Short names: OpenLRM's "mix" weights (more, and real-world, training data); InstantMesh's large models.
ALIASES = {**{f"openlrm-{size}": f"openlrm-mix-{size}" for size in OPENLRM_SIZES},
           "instantmesh": "instantmesh-large", "instantnerf": "instantnerf-large"}

# Background removal (rembg's u2net). Published on GitHub with an md5 only; its sha256 is recorded on
# first download and enforced from then on.
U2NET = RemoteFile("danielgatis/rembg", "v0.0.0", "u2net.onnx", None, None,
                   url="https://github.com/danielgatis/rembg/releases/download/v0.0.0/u2net.onnx",
                   md5="60024c5c889badc19c04ad937298a77b")


def get(model_id: str) -> ModelSpec:
    try:
        return MODELS[ALIASES.get(model_id, model_id)]
    except KeyError:
        raise InputError(f"unknown model {model_id!r}; available: {', '.join([*MODELS, *ALIASES])}") from None


def store_folder(spec: ModelSpec, store: Optional[Path] = None) -> Path:
    return Path(store or default_store()) / spec.id


def hf_cache_folders(spec: ModelSpec) -> list[Path]:
    """Snapshots of the model's repo in the Hugging Face cache, the pinned revision first."""
    snapshots = repo_folder(spec.repo) / "snapshots"
    if not snapshots.is_dir():
        return []
    pinned = spec.files[0].revision
    return sorted(snapshots.iterdir(), key=lambda p: (p.name != pinned, -p.stat().st_mtime))


def cache_folder(spec: ModelSpec, store: Optional[Path] = None, views_only: bool = False) -> Optional[Path]:
    """The model's files in the Hugging Face cache at their pinned revisions, used where they are: its repo's
    snapshot folder when it holds them all; for a model whose files come from several repos (InstantMesh), the
    model's folder in the store made of links to them (no copy). None when the cache lacks a file."""
    needed = _needed(spec, views_only)
    found = {f: cached(f) for f in needed}
    if None in found.values():
        return None
    if len({(f.repo, f.revision) for f in needed}) == 1:
        return snapshot_of(needed[0].repo, needed[0].revision)
    folder = store_folder(spec, store)
    for f, path in found.items():
        link_into(path, folder / f.path)
    return folder if _complete(spec, folder, views_only) else None


def link_into(source: Path, dest: Path) -> None:
    """``dest`` made a link to ``source`` (a symbolic link, else a hard link where the system allows none; an
    existing file there is left alone). Neither possible (a Windows account without the right, the cache on
    another drive): nothing, and the model is not found there."""
    if dest.is_file():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink():
        dest.unlink()  # a link into a cache that was cleared
    try:
        os.symlink(Path(source).absolute(), dest)
    except OSError:
        try:
            os.link(os.path.realpath(source), dest)
        except OSError:
            pass


def _needed(spec: ModelSpec, views_only: bool) -> tuple:
    if views_only and spec.views_stage_files is not None:
        return tuple(f for f in spec.files if f.path in spec.views_stage_files)
    return spec.files


def _complete(spec: ModelSpec, folder: Path, views_only: bool = False) -> bool:
    """Every file present with its published size (a partial or foreign file does not count)."""
    for f in _needed(spec, views_only):
        path = folder / f.path
        if not path.is_file() or (f.size is not None and path.stat().st_size != f.size):
            return False
    return True


def find_folder(spec: ModelSpec, weights: Optional[str] = None, views_only: bool = False) -> Path:
    """``views_only``: only the files that reconstruct from ready-made views are needed (multi-view models)."""
    needed = _needed(spec, views_only)
    if weights:
        folder = Path(weights).expanduser()
        if not folder.is_dir():
            raise WeightsError(f"model folder not found: {folder}")
        missing = [f.path for f in needed if not (folder / f.path).is_file()]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            repos = " and ".join(dict.fromkeys(f.repo for f in needed))
            raise WeightsError(f"{folder} lacks {shown} for {spec.display_name}",
                               hint=f"It must hold the files of {repos}: {', '.join(f.path for f in needed)}.")
        return folder
    if _complete(spec, store_folder(spec), views_only):
        return store_folder(spec)
    pinned = cache_folder(spec, views_only=views_only)
    if pinned is not None:
        return pinned
    searched = [store_folder(spec), hub_cache()] + hf_cache_folders(spec)
    for folder in searched[2:]:
        if _complete(spec, folder, views_only):
            return folder
    files = ", ".join(f"{f.path} ({human_size(f.size)})" for f in needed)
    raise WeightsError(
        f"{spec.display_name} weights not found (looked in: {', '.join(map(str, searched))})",
        hint=f"Download them with `python -m backend download --model {spec.id}` (or the Download button in "
             f"the add-on's preferences), or put {files} from "
             f"{' and '.join(dict.fromkeys(f'https://huggingface.co/{f.repo}' for f in needed))} "
             f"into {store_folder(spec)}, or pass a folder with --weights DIR.")


def load(spec: ModelSpec, weights: Optional[str], device, cache: Optional[dict] = None, views_only: bool = False):
    folder = find_folder(spec, weights, views_only).resolve()
    key = (spec.id, str(folder), str(device))
    if cache is not None and key in cache:
        return cache[key]
    if cache is not None:
        cache.clear()  # one model in memory at a time
    model = spec.loader(folder, device)
    if cache is not None:
        cache[key] = model
    return model


def _local(f: RemoteFile, spec: ModelSpec, store: Path) -> Optional[Path]:
    """Where ``f`` already is: the model's store folder (a file an earlier version downloaded, or a link), another
    model's there (earlier versions kept InstantMesh's shared files in the first variant's), else the cache at its
    pinned revision. Sizes only: a download hashes what it finds before trusting it."""
    for other in (spec, *(m for m in MODELS.values() if m.id != spec.id and f in m.files)):
        path = store / other.id / f.path
        if path.is_file() and (f.size is None or path.stat().st_size == f.size):
            return path
    return cached(f)


def missing_files(spec: ModelSpec, store: Optional[Path] = None) -> list:
    """The model's files a download would fetch: in neither its store folder nor the cache."""
    store = Path(store or default_store())
    return [f for f in spec.files if _local(f, spec, store) is None]


def fetch(model_id: str, store: Optional[Path] = None, *, token: Optional[str] = None,
          online: Optional[bool] = None, progress=None, cancelled=None) -> Path:
    """Make a model's files (or ``u2net``) present and verified; returns the model's folder in the store. Files are
    downloaded into the Hugging Face cache (or used there when already in it) and linked into ``<store>/<id>/``;
    u2net goes into ``<store>/u2net/``. ``progress(done, total, rate)`` counts bytes over all of the files."""
    from ..hub import Checksums, OfflineError, download

    store = Path(store or default_store())
    spec = None if model_id == "u2net" else get(model_id)
    files = (U2NET,) if spec is None else spec.files
    folder = store / ("u2net" if spec is None else spec.id)  # an alias downloads where the model is looked for
    checksums = Checksums(store / "checksums.json")
    total = None if None in [f.size for f in files] else sum(f.size for f in files)
    before = 0
    for f in files:
        def report(done, _total, rate, before=before):
            if progress:
                progress(before + done, total, rate)

        dest = folder / f.path
        try:
            path = download(f, dest if spec is None else _local(f, spec, store), checksums=checksums,
                            token=token or os.environ.get("HF_TOKEN"), online=online, progress=report,
                            cancelled=cancelled)
        except OfflineError as e:  # where this model's files are looked for, not the cache's inner layout
            raise OfflineError(e.message, hint=f"Put {f.path} from {f.repo} (revision {f.revision}) into {folder}, "
                                               f"or allow online access (Blender: Preferences > System > "
                                               f"Network).") from None
        if path != dest:
            if dest.is_file() or dest.is_symlink():
                dest.unlink()  # an earlier version's file of the wrong size, or a link to a removed blob
            link_into(path, dest)
        before += path.stat().st_size
    return folder
