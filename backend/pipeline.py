"""The one pipeline: image file -> preprocessed image -> model -> coloured mesh (Blender frame).

The CLI (``python -m backend generate``) and the worker behind Blender's operator both call
:func:`generate`. Progress is reported through ``progress(stage, fraction, message)``; ``cancelled()``
is polled between chunks of work and a cancelled job raises :class:`~.errors.Cancelled`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from .errors import Cancelled, InputError, OutOfMemory, is_out_of_memory

ProgressFn = Callable[[str, float, str], None]

# Stage names as they appear on the wire and in the --json summary.
STAGE_LOAD = "loading_model"
STAGE_BACKGROUND = "removing_background"
STAGE_ENCODE = "encoding"
STAGE_TRIPLANE = "building_triplanes"
STAGE_SURFACE = "extracting_surface"
STAGE_COLOR = "colouring"

MIN_RESOLUTION, MAX_RESOLUTION = 32, 1024
MAX_SOURCE_SIZE = 2048


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

    def to_dict(self) -> dict:
        return asdict(self)


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
             cancelled: Optional[Callable[[], bool]] = None, model_cache: Optional[dict] = None):
    """Run the whole pipeline and return a :class:`~.mesh.Mesh` in Blender's frame.

    ``model_cache`` (a dict owned by the caller) keeps loaded models between calls, as the worker does.
    """
    options.validate()
    stages = _Stages(progress, cancelled)
    try:
        return _run(Path(image_path), options, stages, model_cache)
    except Exception as e:
        if is_out_of_memory(e):
            raise OutOfMemory(f"ran out of memory during {stages.current or 'generation'}") from e
        raise


def _run(image_path: Path, options: Options, stages: _Stages, model_cache):
    from . import devices, licences, preprocess
    from .models import registry

    spec = registry.get(options.model)
    licences.ensure_accepted(spec.licence, spec.id, spec.display_name, accept_now=options.accept_licence)
    options = replace(options, resolution=options.resolution or spec.default_resolution,
                      threshold=spec.default_threshold if options.threshold is None else options.threshold)
    device = devices.resolve(options.device)

    stages.begin(STAGE_BACKGROUND, "reading image")
    image = preprocess.load_image(image_path)
    stages.check()
    conditioning = preprocess.prepare(
        image,
        recipe=spec.preprocessing,
        remove_background=options.remove_background,
        foreground_ratio=options.foreground_ratio,
        u2net_path=options.u2net_path,
    )

    stages.begin(STAGE_LOAD, f"loading {spec.display_name}")
    model = registry.load(spec, options.weights, device, cache=model_cache)

    mesh = model.reconstruct(conditioning, options, stages)
    stages.end()
    mesh.stats.update(
        seconds={k: round(v, 3) for k, v in stages.seconds.items()},
        device=str(device),
        model=spec.id,
    )
    return mesh
