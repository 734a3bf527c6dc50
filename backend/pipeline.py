"""The one pipeline: image file -> preprocessed image -> model -> coloured mesh (Blender frame).
Multi-view models (InstantMesh) put a diffusion stage between the two (image -> six views -> mesh), or
start from ready-made views (``Options.views``).

The CLI (``python -m backend generate``) and the worker behind Blender's operator both call
:func:`generate`. Progress is reported through ``progress(stage, fraction, message)``; ``cancelled()``
is polled between chunks of work and a cancelled job raises :class:`~.errors.Cancelled`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

from .errors import InputError, OutOfMemory, is_out_of_memory
from .options import DEFAULT_BAKE_SIZE, DEFAULT_GUIDANCE, DEFAULT_SEED, DEFAULT_STEPS, Options, check
from .progress import ProgressFn, Stages
from .protocol import Stage


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
        return _generate(_source(image_path), options, stages, model_cache, field_cache)
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
        sources = {} if options.colours == "images" else None
        spec, model, planes, used, options = _field(_source(image_path), options, stages, model_cache,
                                                    field_cache, sources)
        painting = _painting(model, sources, _source(image_path), spec, options, stages, vertices, corner_verts,
                             loop_totals)
        uvs, texture, stats = bake_polygons(vertices, corner_verts, loop_totals, uvs, model.colour_field(planes),
                                            int(options.texture), stages, painting, options.model)
        stats.update(used, **_finish_stats(spec, options, stages))
        return uvs, texture, stats
    except Exception as e:
        raise _as_out_of_memory(e, stages) from e


def _source(image):
    """An image file's path, or an image already read (the server decodes each upload once, on arrival)."""
    from PIL import Image

    return image if not image or isinstance(image, Image.Image) else Path(image)


def _begin(image_path, options: Options, progress, cancelled) -> "Stages":
    from . import preprocess
    from .models import registry

    check(options, registry.get(options.model))
    if options.views is not None:
        preprocess.check_views_image(Path(options.views))
    if image_path is not None and options.views is not None:
        raise InputError("give an image or a views grid (--views), not both")
    if image_path is None and options.views is None and not options.field_id:
        raise InputError("no input image given")
    return Stages(progress, cancelled)


def _as_out_of_memory(e: Exception, stages: "Stages") -> Exception:
    if is_out_of_memory(e):
        return OutOfMemory(f"ran out of memory during {stages.current or 'generation'}")
    return e


def _generate(image_path: Optional[Path], options: Options, stages: Stages, model_cache, field_cache):
    from . import postprocess

    sources = {} if options.colours == "images" else None
    spec, model, planes, used, options = _field(image_path, options, stages, model_cache, field_cache, sources)
    mesh = model.mesh_from(planes, options, stages)
    mesh.stats.update(used)
    painting = _painting(model, sources, image_path, spec, options, stages, mesh.vertices, mesh.faces)
    mesh = postprocess.run(mesh, model.colour_field(planes), options, stages, painting)
    mesh.stats.update(_finish_stats(spec, options, stages))
    return mesh


def _field(image_path: Optional[Path], options: Options, stages: Stages, model_cache, field_cache, sources=None):
    """The object's triplanes: from the field cache (``options.field_id``), else from the image (or the views).
    Returns (spec, model, planes, what was used, the options with the model's defaults filled in). ``sources``
    (a dict, for painting) receives the framed picture ("picture") and a multi-view model's six-view grid
    ("grid"). The cache keeps the grid with the planes, whatever the colours: a later bake may paint from it."""
    from . import devices, licences
    from .models import registry

    spec = registry.get(options.model)
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
            planes, used, grid = cached
            _keep_grid(sources, grid)
            stages.begin(Stage.LOAD, f"loading {spec.display_name}")
            model = registry.load(spec, options.weights, device, cache=model_cache, views_only=spec.multiview)
            used.update(field_id=options.field_id, field="cached")
            return spec, model, planes.to(model.device), used, options
        stages.begin(Stage.FIELD, "the cached field is gone: recomputing it from the image")
        if image_path is None and options.views is None:
            raise InputError("this generation's field is no longer cached and no source image was given",
                             hint="Keep the source image reachable (pack it into the .blend, or keep its file).")

    if views_only:  # stage 2 of a multi-view model alone
        stages.begin(Stage.LOAD, f"loading {spec.display_name}")
        model = registry.load(spec, options.weights, device, cache=model_cache, views_only=True)
        grid = _read_views(Path(options.views))
        planes, used = model.planes_from_views(grid, options, stages)
    else:
        model, planes, used, options, grid = _field_from_image(image_path, spec, options, device, stages,
                                                               model_cache, sources)
    _keep_grid(sources, grid)
    if field_cache is not None:
        field_id = options.field_id or field_cache.new_id()
        field_cache.save(field_id, planes, key, used, grid=grid)
        used.update(field_id=field_id, field="recomputed" if options.field_id else "new")
    return spec, model, planes, used, options


def _keep_grid(sources: Optional[dict], grid) -> None:
    if sources is not None and grid is not None:
        sources["grid"] = grid


def _read_views(path: Path):
    """The six-view grid of ``--views``, read once: (960, 640, 3) uint8 (its size is checked by the model)."""
    import numpy as np

    from . import preprocess

    return np.asarray(preprocess.load_image(path).convert("RGB"))


def _field_from_image(image_path: Path, spec, options: Options, device, stages: Stages, model_cache, sources=None):
    """-> (model, planes, used, options, the generated grid or None). ``sources``: see :func:`_field`."""
    from PIL import Image

    from . import preprocess
    from .models import registry

    stages.begin(Stage.BACKGROUND, "reading image")
    image = image_path if isinstance(image_path, Image.Image) else preprocess.load_image(image_path)
    stages.check()
    conditioning = preprocess.prepare(
        image,
        recipe=spec.preprocessing,
        remove_background=options.remove_background,
        foreground_ratio=options.foreground_ratio,
        u2net_path=options.u2net_path,
        keep=sources,
    )

    stages.begin(Stage.LOAD, f"loading {spec.display_name}")
    model = registry.load(spec, options.weights, device, cache=model_cache)
    if not spec.multiview:
        planes, used = model.make_planes(conditioning, options, stages)
        return model, planes, used, options, None

    model.load_views_model(options.precision)
    options = replace(options, steps=options.steps or DEFAULT_STEPS, seed=DEFAULT_SEED if options.seed is None
                      else options.seed, guidance=DEFAULT_GUIDANCE if options.guidance is None else options.guidance)
    stages.begin(Stage.VIEWS, f"{options.steps} diffusion steps")
    grid = model.generate_views(conditioning, options, stages)
    if options.save_views:
        save_views(grid, Path(options.save_views))
    planes, used = model.planes_from_views(grid, options, stages)
    used.update(steps=options.steps, guidance=options.guidance, seed=options.seed)
    return model, planes, used, options, grid


def _painting(model, sources: Optional[dict], image, spec, options: Options, stages: Stages, vertices, faces,
              loop_totals=None):
    """``--colours images``: the views the model saw, placed against this mesh (faces, or corner vertices and
    polygon sizes). The picture is prepared again when the field came from the cache; a multi-view model's
    generated views come with its cached field (or from ``--views``)."""
    if sources is None:
        return None
    import numpy as np

    from . import preprocess
    from .postprocess.colours import painting_for

    if "picture" not in sources and image is not None and options.views is None:
        stages.begin(Stage.BACKGROUND, "reading the image to paint from")
        loaded = image if not isinstance(image, (str, Path)) else preprocess.load_image(Path(image))
        preprocess.prepare(loaded, recipe=spec.preprocessing, remove_background=options.remove_background,
                           foreground_ratio=options.foreground_ratio, u2net_path=options.u2net_path, keep=sources)
    if loop_totals is not None:
        from .postprocess.atlas import fan

        tri_loops, _ = fan(np.asarray(loop_totals, np.int64).reshape(-1))
        faces = np.asarray(faces, np.int64).reshape(-1)[tri_loops]
    vertices = np.asarray(vertices, np.float32).reshape(-1, 3)
    return painting_for(model, sources.get("picture"), sources.get("grid"), vertices, faces, stages)


def save_views(grid, path: Path) -> None:
    """Write the grid as PNG, whole or not at all."""
    from PIL import Image

    from .files import atomic_output

    with atomic_output(path) as f:
        Image.fromarray(grid, "RGB").save(f, format="PNG")


def _finish_stats(spec, options: Options, stages: Stages) -> dict:
    from . import devices

    stages.end()
    return {"seconds": {k: round(v, 3) for k, v in stages.seconds.items()},
            "device": str(devices.resolve(options.device)), "model": spec.id}
