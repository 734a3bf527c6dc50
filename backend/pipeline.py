"""The one pipeline: image file -> preprocessed image -> model -> coloured mesh (Blender frame).
Multi-view models (InstantMesh) put a diffusion stage between the two (image -> six views -> mesh), or
start from ready-made views (``Options.views``).

The CLI (``python -m backend generate``) and the worker behind Blender's operator both call
:func:`generate`. Progress is reported through ``progress(stage, fraction, message)``; ``cancelled()``
is polled between chunks of work and a cancelled job raises :class:`~.errors.Cancelled`.
"""

from __future__ import annotations

import importlib.util
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from . import stages as stage
from .errors import Cancelled, InputError, OutOfMemory, is_out_of_memory

ProgressFn = Callable[[str, float, str], None]

MIN_RESOLUTION, MAX_RESOLUTION = 32, 1024
MAX_SOURCE_SIZE = 2048
MAX_STEPS, MAX_GUIDANCE, MAX_SEED = 500, 30.0, 2**63 - 1
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_SEED = 75, 4.0, 42  # InstantMesh's run.py (spec instantmesh.md §1.4)
VIEWS_SIZE = (640, 960)  # width, height of the six-view grid
MIN_FACES, MAX_FACES = 100, 10_000_000
MIN_TEXTURE, MAX_TEXTURE = 512, 4096
DEFAULT_BAKE_SIZE = 2048  # Bake from Model without a texture size
FIELD_ID = re.compile(r"^[0-9a-f]{32}$")  # a cached field's name (never a path)


@dataclass
class Options:
    model: str = "triposr"
    weights: Optional[str] = None  # model folder in the official layout; None = resolve by model id
    resolution: Optional[int] = None  # None = the model's default
    threshold: Optional[float] = None  # None = the model's default
    foreground_ratio: Optional[float] = None  # None = the model's (TripoSR 0.85, OpenLRM 0.8)
    remove_background: bool = True
    device: str = "auto"
    u2net_path: Optional[str] = None  # background-removal model file; None = default location
    source_size: Optional[int] = None  # encoder input side in pixels; None = the model's (multiple of its patch)
    accept_licence: bool = False  # accept (and remember) a restrictive weights licence, e.g. CC BY-NC
    # Multi-view models only:
    views: Optional[str] = None  # a 960×640 grid of six views: skip the image, background removal and stage 1
    save_views: Optional[str] = None  # write the generated grid here (PNG)
    steps: Optional[int] = None  # diffusion steps; None = 75
    guidance: Optional[float] = None  # classifier-free guidance scale; None = 4.0
    seed: Optional[int] = None  # None = 42
    # Post-processing (every model):
    faces: Optional[int] = None  # reduce to about this many faces; None = as extracted
    quads: bool = False  # quad-dominant retopology at the face budget (needs faces)
    texture: Optional[int] = None  # bake a SIZE² texture from the field (reduces to a default budget first)
    field_id: Optional[str] = None  # reuse this generation's cached field (Retopologize, Bake from Model)
    # Surface extraction: False = coarse to fine (full resolution only near the surface, the same mesh);
    # True = evaluate the density at every grid point (slower; for comparison, and as a fallback).
    dense: bool = False

    def validate(self) -> None:
        if self.resolution is not None and not MIN_RESOLUTION <= int(self.resolution) <= MAX_RESOLUTION:
            raise InputError(f"resolution must be between {MIN_RESOLUTION} and {MAX_RESOLUTION}, got {self.resolution}")
        if self.foreground_ratio is not None and not 0.1 <= float(self.foreground_ratio) <= 1.0:
            raise InputError(f"foreground ratio must be between 0.1 and 1.0, got {self.foreground_ratio}")
        if self.source_size is not None and not 1 <= int(self.source_size) <= MAX_SOURCE_SIZE:
            raise InputError(f"source size must be between 1 and {MAX_SOURCE_SIZE} pixels, got {self.source_size}")
        if self.threshold is not None and not float(self.threshold) > 0:
            raise InputError(f"threshold must be positive, got {self.threshold}")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not str(self.device).startswith("cuda:"):
            raise InputError(f"unknown device {self.device!r}; use auto, cpu, cuda or mps")
        if self.steps is not None and not 1 <= int(self.steps) <= MAX_STEPS:
            raise InputError(f"steps must be between 1 and {MAX_STEPS}, got {self.steps}")
        if self.guidance is not None and not 1.0 <= float(self.guidance) <= MAX_GUIDANCE:
            raise InputError(f"guidance must be between 1 and {MAX_GUIDANCE:g}, got {self.guidance}")
        if self.seed is not None and not 0 <= int(self.seed) <= MAX_SEED:
            raise InputError(f"seed must be between 0 and 2**63 - 1, got {self.seed}")
        if self.faces is not None and not MIN_FACES <= int(self.faces) <= MAX_FACES:
            raise InputError(f"faces must be between {MIN_FACES} and {MAX_FACES:,}, got {self.faces}",
                             hint="Leave --faces out to keep the surface as extracted.")
        if self.quads and self.faces is None:
            raise InputError("--quads needs a face budget: add --faces N")
        if self.texture is not None and not MIN_TEXTURE <= int(self.texture) <= MAX_TEXTURE:
            raise InputError(f"texture size must be between {MIN_TEXTURE} and {MAX_TEXTURE} pixels, got {self.texture}")
        if self.texture is not None and importlib.util.find_spec("xatlas") is None:
            # backend/requirements.txt leaves it out where it has no wheel (Linux aarch64)
            raise InputError("a texture needs the UV atlas package xatlas, which is not installed here",
                             hint="Install it with a C++ compiler at hand: pip install xatlas==0.0.11; "
                                  "or leave the texture out (vertex colours).")
        if self.field_id is not None and not FIELD_ID.match(str(self.field_id)):
            raise InputError(f"not a field id: {self.field_id!r}")
        if self.save_views is not None:
            if Path(self.save_views).suffix.lower() != ".png":
                raise InputError(f"the views are saved as PNG, not {Path(self.save_views).name!r}")
            if not Path(self.save_views).parent.resolve().is_dir():
                raise InputError(f"folder for the views image does not exist: {Path(self.save_views).parent}")
        if self.views is not None:
            check_views_image(Path(self.views))

    def to_dict(self) -> dict:
        return asdict(self)


def check_views_image(path: Path) -> None:
    """A readable 960×640 image (read from its header only)."""
    from PIL import UnidentifiedImageError

    from .preprocess import open_image

    if not path.is_file():
        raise InputError(f"views image not found: {path}")
    try:
        with open_image(path) as im:
            size = im.size
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(f"views image {path} could not be read ({e})") from None
    if size != VIEWS_SIZE:
        raise InputError(f"the views image must be {VIEWS_SIZE[0]}×{VIEWS_SIZE[1]} (3 rows × 2 columns of 320² "
                         f"views), got {size[0]}×{size[1]}: {path}",
                         hint="Use a grid saved by --save-views, or Zero123++ v1.2's output.")


def check_model_options(spec, options: Options) -> None:
    """Options that one kind of model cannot use are refused rather than ignored."""
    drawing = {"--save-views": options.save_views, "--steps": options.steps, "--guidance": options.guidance,
               "--seed": options.seed}
    rules = []
    if spec.default_threshold is None:
        rules.append(({"--threshold": options.threshold}, f"{spec.display_name} extracts its surface at SDF 0"))
    if spec.multiview:
        rules.append(({"--source-size": options.source_size},
                      f"{spec.display_name} reconstructs from generated views of a fixed size"))
        if options.views is not None:
            rules.append((drawing, "the views are given, so no image is prepared and no views are generated"))
    else:
        rules.append(({"--views": options.views, **drawing},
                      f"{spec.display_name} reconstructs from the image alone (no view generation)"))
    for unused, why in rules:
        given = [name for name, value in unused.items() if value is not None]
        if given:
            raise InputError(f"{', '.join(given)} does not apply: {why}")


def check_source_size(size: int, patch: int) -> int:
    """The encoder cuts its input into ``patch``-pixel squares: the side must be a multiple of it."""
    if size < patch or size % patch:
        lower = max(patch, size // patch * patch)
        raise InputError(f"source size {size} is not a multiple of the image encoder's {patch}-pixel patches",
                         hint=f"Use a multiple of {patch}, e.g. {lower} or {lower + patch}.")
    return size


class _Stages:
    """Progress + cancellation + per-stage timing, handed to models and extraction code."""

    def __init__(self, progress: Optional[ProgressFn], cancelled: Optional[Callable[[], bool]]):
        self._progress = progress
        self._cancelled = cancelled
        self.seconds: dict[str, float] = {}
        self._stage, self._t0 = None, 0.0

    def begin(self, stage: str, message: str = "") -> None:
        self.end()
        self._stage, self._t0 = stage, time.perf_counter()
        self.update(0.0, message)

    def update(self, fraction: float, message: str = "") -> None:
        self.check()
        if self._progress and self._stage:
            self._progress(self._stage, float(fraction), message)

    def check(self) -> None:
        if self._cancelled and self._cancelled():
            raise Cancelled()

    @property
    def current(self) -> Optional[str]:
        return self._stage

    def end(self) -> None:
        if self._stage:
            self.seconds[self._stage] = self.seconds.get(self._stage, 0.0) + time.perf_counter() - self._t0
            self._stage = None


def generate(image_path, options: Options, progress: Optional[ProgressFn] = None,
             cancelled: Optional[Callable[[], bool]] = None, model_cache: Optional[dict] = None,
             field_cache=None):
    """Run the whole pipeline and return a :class:`~.mesh.Mesh` in Blender's frame.

    ``model_cache`` (a dict owned by the caller) keeps loaded models between calls, as the worker does.
    ``field_cache`` (a :class:`~.field.FieldCache`) keeps the generation's field for later bakes: its id is
    ``stats["field_id"]``; with ``options.field_id`` that field is reused (and recomputed if it is gone).
    """
    stages = _begin(image_path, options, progress, cancelled)
    try:
        return _generate(image_path and Path(image_path), options, stages, model_cache, field_cache)
    except Exception as e:
        raise _as_out_of_memory(e, stages) from e


def bake(image_path, options: Options, vertices, corner_verts, loop_totals, uvs=None,
         progress: Optional[ProgressFn] = None, cancelled: Optional[Callable[[], bool]] = None,
         model_cache: Optional[dict] = None, field_cache=None):
    """Bake from Model: a ``options.texture``² texture from the field of generation ``options.field_id`` on
    any mesh in the generated mesh's frame (polygons as Blender holds them). No UVs: xatlas makes them.
    Returns (uvs (L, 2) per loop, texture (S, S, 3) uint8, stats)."""
    from .postprocess import bake_polygons

    if options.texture is None:
        options = replace(options, texture=DEFAULT_BAKE_SIZE)
    stages = _begin(image_path, options, progress, cancelled)
    try:
        spec, model, planes, used, options = _field(image_path and Path(image_path), options, stages, model_cache,
                                                    field_cache)
        uvs, texture, stats = bake_polygons(vertices, corner_verts, loop_totals, uvs, model.colour_field(planes),
                                            int(options.texture), stages)
        stats.update(used, **_finish_stats(spec, options, stages))
        return uvs, texture, stats
    except Exception as e:
        raise _as_out_of_memory(e, stages) from e


def _begin(image_path, options: Options, progress, cancelled) -> "_Stages":
    options.validate()
    if image_path is not None and options.views is not None:
        raise InputError("give an image or a views grid (--views), not both")
    if image_path is None and options.views is None and not options.field_id:
        raise InputError("no input image given")
    return _Stages(progress, cancelled)


def _as_out_of_memory(e: Exception, stages: "_Stages") -> Exception:
    if is_out_of_memory(e):
        return OutOfMemory(f"ran out of memory during {stages.current or 'generation'}")
    return e


def _generate(image_path: Optional[Path], options: Options, stages: _Stages, model_cache, field_cache):
    from . import postprocess

    spec, model, planes, used, options = _field(image_path, options, stages, model_cache, field_cache)
    mesh = model.mesh_from(planes, options, stages)
    mesh.stats.update(used)
    mesh = postprocess.run(mesh, model.colour_field(planes), options, stages)
    mesh.stats.update(_finish_stats(spec, options, stages))
    return mesh


def _field(image_path: Optional[Path], options: Options, stages: _Stages, model_cache, field_cache):
    """The object's triplanes: from the field cache (``options.field_id``), else from the image (or the views).
    Returns (spec, model, planes, what was used, the options with the model's defaults filled in)."""
    from . import devices, licences
    from .models import registry

    spec = registry.get(options.model)
    check_model_options(spec, options)
    licences.ensure_accepted(spec.licence, spec.id, spec.display_name, accept_now=options.accept_licence)
    # A multi-view model's default grid is its config's (spec.default_resolution says what the official one is).
    options = replace(options, resolution=options.resolution or (None if spec.multiview else spec.default_resolution),
                      threshold=spec.default_threshold if options.threshold is None else options.threshold)
    device = devices.resolve(options.device)
    views_only = options.views is not None
    key = f"{spec.id}:{options.weights or ''}"  # planes decode only with the weights that made them

    if options.field_id and field_cache is not None:
        cached = field_cache.load(options.field_id, key)
        if cached is not None:
            planes, used = cached
            stages.begin(stage.LOAD, f"loading {spec.display_name}")
            model = registry.load(spec, options.weights, device, cache=model_cache, views_only=spec.multiview)
            used.update(field_id=options.field_id, field="cached")
            return spec, model, planes.to(model.device), used, options
        stages.begin(stage.FIELD, "the cached field is gone: recomputing it from the image")
        if image_path is None and options.views is None:
            raise InputError("this generation's field is no longer cached and no source image was given",
                             hint="Keep the source image reachable (pack it into the .blend, or keep its file).")

    if views_only:  # stage 2 of a multi-view model alone
        stages.begin(stage.LOAD, f"loading {spec.display_name}")
        model = registry.load(spec, options.weights, device, cache=model_cache, views_only=True)
        planes, used = model.planes_from_views(Path(options.views), options, stages)
    else:
        model, planes, used, options = _field_from_image(image_path, spec, options, device, stages, model_cache)
    if field_cache is not None:
        field_id = options.field_id or field_cache.new_id()
        field_cache.save(field_id, planes, key, used)
        used.update(field_id=field_id, field="recomputed" if options.field_id else "new")
    return spec, model, planes, used, options


def _field_from_image(image_path: Path, spec, options: Options, device, stages: _Stages, model_cache):
    from . import preprocess
    from .models import registry

    stages.begin(stage.BACKGROUND, "reading image")
    image = preprocess.load_image(image_path)
    stages.check()
    conditioning = preprocess.prepare(
        image,
        recipe=spec.preprocessing,
        remove_background=options.remove_background,
        foreground_ratio=options.foreground_ratio,
        u2net_path=options.u2net_path,
    )

    stages.begin(stage.LOAD, f"loading {spec.display_name}")
    model = registry.load(spec, options.weights, device, cache=model_cache)
    if not spec.multiview:
        planes, used = model.make_planes(conditioning, options, stages)
        return model, planes, used, options

    model.load_views_model()
    options = replace(options, steps=options.steps or DEFAULT_STEPS, seed=DEFAULT_SEED if options.seed is None
                      else options.seed, guidance=DEFAULT_GUIDANCE if options.guidance is None else options.guidance)
    stages.begin(stage.VIEWS, f"{options.steps} diffusion steps")
    grid = model.generate_views(conditioning, options, stages)
    if options.save_views:
        save_views(grid, Path(options.save_views))
    planes, used = model.planes_from_views(grid, options, stages)
    used.update(steps=options.steps, guidance=options.guidance, seed=options.seed)
    return model, planes, used, options


def save_views(grid, path: Path) -> None:
    """Write the grid as PNG under a temporary name, then rename (no half-written file is left)."""
    from PIL import Image

    tmp = path.with_name(f".{path.name}.partial")
    try:
        Image.fromarray(grid, "RGB").save(tmp, format="PNG")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _finish_stats(spec, options: Options, stages: _Stages) -> dict:
    from . import devices

    stages.end()
    return {"seconds": {k: round(v, 3) for k, v in stages.seconds.items()},
            "device": str(devices.resolve(options.device)), "model": spec.id}
