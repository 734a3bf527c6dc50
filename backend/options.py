"""Every option of a job, its limits and defaults, and the one check that every entry point calls.

The CLI, a batch (local or on Ray), the worker and the server build :class:`Options` and call :func:`check`
before any work; the server adds only its own refusals (options it keeps for itself, the models it serves).
Standard library only at import (Blender reads the defaults); Pillow is imported to read a views grid's size.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

from .errors import InputError
from .devices import PRECISIONS
from .protocol import FIELD_ID

MIN_RESOLUTION, MAX_RESOLUTION = 32, 1024
MAX_SOURCE_SIZE = 2048
MAX_STEPS, MAX_GUIDANCE, MAX_SEED = 500, 30.0, 2**63 - 1
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_SEED = 75, 4.0, 42  # InstantMesh's run.py (spec instantmesh.md §1.4)
SHAPE_DEFAULTS = {"steps": 50, "guidance": 7.0, "seed": 42}  # TripoSG's scripts/inference_triposg.py
VIEWS_SIZE = (640, 960)  # width, height of the six-view grid
MIN_FACES, MAX_FACES = 100, 10_000_000
MIN_TEXTURE, MAX_TEXTURE = 512, 4096
COLOURS = ("field", "images")  # where colours come from: the model's field, or the pictures it saw (painting)
# The object's share of the frame after preprocessing, per recipe (the references' defaults).
FOREGROUND_RATIO = {"triposr": 0.85, "openlrm": 0.8, "instantmesh": 0.85, "triposg": 1 / 1.2}
DEFAULT_BAKE_SIZE = 1024  # Bake from Model when neither the request nor the object names a texture size


@dataclass
class Options:
    model: str = "triposr"
    weights: Optional[str] = None  # model folder in the official layout; None = resolve by model id
    resolution: Optional[int] = None  # None = the model's default
    threshold: Optional[float] = None  # None = the model's default
    foreground_ratio: Optional[float] = None  # None = the model's (TripoSR 0.85, OpenLRM 0.8)
    remove_background: bool = True
    device: str = "auto"
    # Precision of the transformers and the diffusion U-Net: auto, fp32, fp16 or bf16 (backend/devices.py says
    # what auto picks per device; each model keeps in fp32 what its mesh is sensitive to).
    precision: str = "auto"
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
    # "field": every colour from the model's field; "images": painted from the pictures the model saw, the
    # field (or colours spread over the surface) where none sees the surface (backend/postprocess/paint.py).
    colours: str = "field"
    # Surface extraction: False = coarse to fine (full resolution only near the surface, the same mesh);
    # True = evaluate the density at every grid point (slower; for comparison, and as a fallback).
    dense: bool = False

    def validate(self) -> None:
        """Each option on its own: ranges, names, files. A value of the wrong type raises TypeError/ValueError
        (:func:`check` turns those into a clear ``bad_input``)."""
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
        if self.precision not in PRECISIONS:
            raise InputError(f"unknown precision {self.precision!r}; use {', '.join(PRECISIONS)}")
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
        if self.colours not in COLOURS:
            raise InputError(f"unknown colours {self.colours!r}; use {' or '.join(COLOURS)}")
        if self.field_id is not None and not FIELD_ID.match(str(self.field_id)):
            raise InputError(f"not a field id: {self.field_id!r}")
        if self.save_views is not None:
            if Path(self.save_views).suffix.lower() != ".png":
                raise InputError(f"the views are saved as PNG, not {Path(self.save_views).name!r}")
            if not Path(self.save_views).parent.resolve().is_dir():
                raise InputError(f"folder for the views image does not exist: {Path(self.save_views).parent}")

    def to_dict(self) -> dict:
        return asdict(self)


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
    elif getattr(spec, "sampled", False):  # a diffusion model draws the shape itself (TripoSG)
        rules.append(({"--views": options.views, "--save-views": options.save_views,
                       "--source-size": options.source_size},
                      f"{spec.display_name} draws the shape from the image (no views; its encoder's size is fixed)"))
    else:
        rules.append(({"--views": options.views, **drawing},
                      f"{spec.display_name} reconstructs from the image alone (no view generation)"))
    allowed = getattr(spec, "resolutions", None)
    if allowed and options.resolution is not None and int(options.resolution) not in allowed:
        raise InputError(f"{spec.display_name} takes a resolution of {', '.join(map(str, allowed))}, "
                         f"got {options.resolution}")
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


def parse(raw) -> Options:
    """Options from a request's JSON object; an unknown name is a ``bad_input``."""
    if not isinstance(raw or {}, dict):
        raise InputError("options must be a JSON object")
    try:
        return Options(**(raw or {}))
    except TypeError as exc:
        raise InputError(f"bad options: {exc}") from None


def check(options: Options, spec) -> None:
    """The one check before any work: every option on its own, then what the model ``spec`` (a registry entry)
    can use. Every entry point calls it; a value of the wrong type (``"resolution": "high"``) is a ``bad_input``."""
    check_types(options)
    try:
        options.validate()
    except (TypeError, ValueError) as e:
        raise InputError(f"bad options: {e}") from None
    check_model_options(spec, options)


# An option's declared type (the dataclass's annotation, a string here) -> what a request may send for it.
_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text"}


def check_types(options: Options) -> None:
    """Each option of the type it is declared with (JSON gives strings, numbers, booleans: a request can send any)."""
    for field in fields(Options):
        kind = field.type.removeprefix("Optional[").removesuffix("]")
        value = getattr(options, field.name)
        if value is None and field.type.startswith("Optional["):
            continue
        wrong = not isinstance(value, _TYPES[kind]) or (kind != "bool" and isinstance(value, bool))
        if wrong:
            raise InputError(f"bad options: {field.name} must be {_WORDS[kind]}, got {value!r}")
