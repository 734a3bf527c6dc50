"""Generation settings and job status, at ``scene.image_to_3d``.

The input is one image, or a batch of image files (``batch``, chosen with Open Batch) that Generate 3D runs
one after another.

The model list comes from the backend's registry. Resolution, threshold and foreground ratio follow the
chosen model's own values until the user sets one (``use_custom_*``): then that value is sent, otherwise
None, which the backend reads as "the model's default". Source size 0 means the model's.
Multi-view models (InstantMesh) have no source size (and the mesh variants no threshold); they take steps,
guidance and seed.
Output (faces, quads, texture) shapes what is made from the model's field; Bake from Model and
Retopologize read it too.
"""

import bpy
from bpy.props import (BoolProperty, CollectionProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty,
                       StringProperty)

from .backend.client import catalog
from .backend.options import DEFAULT_BAKE_SIZE
from .preferences import DEVICE_ITEMS

MODEL_ITEMS = tuple(catalog.model_items())
# backend/devices.py's PRECISIONS, and what auto picks there.
PRECISION_ITEMS = (("auto", "Auto", "Full precision on the CPU; on a GPU half precision (bf16 where the GPU has it, "
                                    "else fp16)"),
                   ("fp32", "Full (fp32)", "Full precision everywhere: the reference's numbers, slowest on a GPU"),
                   ("fp16", "Half (fp16)", "Half precision for the networks (fast on every GPU)"),
                   ("bf16", "Half (bf16)", "Brain-float half precision for the networks (recent GPUs)"))
DEFAULT_MODEL = "triposr"
CUSTOMIZABLE = ("resolution", "threshold", "foreground_ratio")
VIEW_SETTINGS = ("steps", "guidance", "seed")
MIN_FACES, MAX_FACES = 100, 10_000_000  # the backend's bounds for a face budget (backend/pipeline.py)
TEXTURE_ITEMS = (
    ("NONE", "None", "Vertex colours only (the mesh's Color attribute)"),
    ("512", "512", "A 512 × 512 texture: a quick draft"),
    ("1024", "1024", "A 1024 × 1024 texture"),
    ("2048", "2048", "A 2048 × 2048 texture"),
    ("4096", "4096", "A 4096 × 4096 texture (slow to bake on a CPU)"),
)


def customizable(model_id: str) -> tuple:
    """The model-default settings this model uses."""
    return tuple(n for n in CUSTOMIZABLE if n != "threshold" or catalog.uses_threshold(model_id))


_applying_defaults = False  # set while the model's defaults are written: those writes are not the user's


def apply_model_defaults(settings) -> None:
    """Show the model's own values in every setting the user has not set."""
    global _applying_defaults
    values = catalog.defaults(settings.model)
    _applying_defaults = True
    try:
        for name in customizable(settings.model):
            if not getattr(settings, f"use_custom_{name}") and getattr(settings, name) != values[name]:
                setattr(settings, name, values[name])
    finally:
        _applying_defaults = False


def _model_changed(self, context):
    apply_model_defaults(self)
    if catalog.draws_samples(self.model):  # InstantMesh's views and TripoSG's shape have their own defaults:
        own = catalog.sampling_defaults(self.model)  # a value still at some model's default follows the model
        for name in ("steps", "guidance"):
            if getattr(self, name) in (catalog.VIEW_DEFAULTS[name], catalog.SHAPE_DEFAULTS[name]):
                setattr(self, name, own[name])


def _marks_custom(name):
    def update(self, context):
        if not _applying_defaults and not getattr(self, f"use_custom_{name}"):
            setattr(self, f"use_custom_{name}", True)
    return update


def _custom_toggled(self, context):
    apply_model_defaults(self)  # unticked: back to the model's value


def effective(settings) -> dict:
    """The values the backend will use, the model's defaults filled in (only those the model uses)."""
    values = catalog.defaults(settings.model)
    out = {name: (getattr(settings, name) if getattr(settings, f"use_custom_{name}") else values[name])
           for name in customizable(settings.model)}
    if catalog.draws_samples(settings.model):
        out.update({name: getattr(settings, name) for name in VIEW_SETTINGS})
    else:
        out["source_size"] = settings.source_size or values["source_size"]
    return out


def source_size_problem(settings) -> str:
    """Why the source size will be refused ('' when fine); the backend says the same."""
    size = settings.source_size
    patch = catalog.defaults(settings.model)["patch"]
    if size == 0 or size % patch == 0:
        return ""
    lower = max(patch, size // patch * patch)
    return f"Not a multiple of the encoder's {patch}-pixel patches: use {lower} or {lower + patch}"


def faces_problem(settings) -> str:
    """Why the face count will be refused ('' when fine)."""
    if 0 < settings.faces < MIN_FACES:
        return f"Faces: 0 keeps the mesh as extracted; a budget is at least {MIN_FACES}"
    return ""


def output_options(settings) -> dict:
    """Faces, quads and texture as the backend takes them: None where unset; quads only with a face budget."""
    faces = int(settings.faces) or None
    return {
        "faces": faces,
        "quads": bool(settings.quads) if faces else False,
        "texture": None if settings.texture == "NONE" else int(settings.texture),
    }


COLOURS_ITEMS = [
    ("images", "From Images", "Paint the colours from the pictures the model saw (sharp as the picture); the "
                              "model's colours where no picture sees the surface"),
    ("field", "From Model", "Every colour from the model's own colour field (softer)"),
]


def views_summary(stats: dict) -> str:
    """How the pictures were placed for painting, in words for the panel ('' when none was painted)."""
    parts = []
    for view in stats.get("views") or ():
        iou = view.get("iou")
        fit = f", overlap {iou:.0%}" if isinstance(iou, (int, float)) else ""
        how = {"fitted": "camera fitted", "model, framing fitted": "framing fitted"}.get(view.get("camera"),
                                                                                       "model's camera")
        parts.append(f"{view.get('view', 'picture')}: {how}{fit}")
    return "; ".join(parts)


class BatchImage(bpy.types.PropertyGroup):
    filepath: StringProperty(name="File", subtype="FILE_PATH")


class ImageTo3DSettings(bpy.types.PropertyGroup):
    image: PointerProperty(name="Image", type=bpy.types.Image, description="The reference image")
    # A batch: when it holds images, Generate 3D makes one object from each (Open Batch chooses them).
    batch: CollectionProperty(name="Batch", type=BatchImage,
                              description="Image files to generate one after another")
    batch_name: StringProperty(name="Batch Name", description="Name of the collection the batch's objects go in")
    model: EnumProperty(name="Model", items=MODEL_ITEMS, default=DEFAULT_MODEL, update=_model_changed,
                        description="The reconstruction model (its weights are downloaded once, in the preferences)")
    resolution: IntProperty(name="Resolution", description="Size of the grid the surface is extracted on: more "
                                                           "detail, more time and memory (the model's own: "
                                                           "TripoSR 256, OpenLRM 384, InstantMesh 128, "
                                                           "InstantNeRF 256)",
                            default=256, min=32, max=1024, soft_min=64, soft_max=512, step=32,
                            update=_marks_custom("resolution"))
    use_custom_resolution: BoolProperty(name="Own Resolution", default=False, update=_custom_toggled,
                                        description="Use this resolution instead of the model's own")
    threshold: FloatProperty(name="Threshold", description="Density at which the surface is extracted: lower "
                                                           "gives a fuller shape, higher a thinner one (the "
                                                           "model's own: TripoSR 25, OpenLRM 3, InstantNeRF 10)",
                             default=25.0, min=0.001, soft_max=100.0, precision=3, step=10,
                             update=_marks_custom("threshold"))
    use_custom_threshold: BoolProperty(name="Own Threshold", default=False, update=_custom_toggled,
                                       description="Use this threshold instead of the model's own")
    foreground_ratio: FloatProperty(name="Foreground Ratio",
                                    description="How much of the model's input square the object fills "
                                                "(the model's own: TripoSR 0.85, OpenLRM 0.8)",
                                    default=0.85, min=0.5, max=1.0, subtype="FACTOR",
                                    update=_marks_custom("foreground_ratio"))
    use_custom_foreground_ratio: BoolProperty(name="Own Foreground Ratio", default=False, update=_custom_toggled,
                                              description="Use this foreground ratio instead of the model's own")
    source_size: IntProperty(name="Source Size", default=0, min=0, max=2048, subtype="PIXEL",
                             description="Side in pixels of the image the encoder sees; 0: the model's own "
                                         "(TripoSR 512; OpenLRM small 224, base 336, large 448). A multiple of "
                                         "the encoder's patch: 16 for TripoSR, 14 for OpenLRM")
    steps: IntProperty(name="Steps", default=catalog.VIEW_DEFAULTS["steps"], min=1, max=catalog.MAX_STEPS,
                       soft_min=10, soft_max=150,
                       description="Diffusion steps when drawing the six views: fewer is faster, with rougher "
                                   "views (on a CPU a step takes tens of seconds)")
    guidance: FloatProperty(name="Guidance", default=catalog.VIEW_DEFAULTS["guidance"], min=1.0,
                            max=catalog.MAX_GUIDANCE, soft_max=10.0, precision=1, step=50,
                            description="How closely the views follow the image (classifier-free guidance)")
    seed: IntProperty(name="Seed", default=catalog.VIEW_DEFAULTS["seed"], min=0,
                      description="Random seed of the view generation: the same seed and image give the same "
                                  "views; another seed gives other guesses of the unseen sides")
    remove_background: BoolProperty(name="Remove Background", default=True,
                                    description="Cut the object out of its background first (images without "
                                                "transparency need this)")
    device: EnumProperty(name="Device", items=(("DEFAULT", "Preferences", "The device set in the preferences"),)
                         + DEVICE_ITEMS, default="DEFAULT")
    precision: EnumProperty(name="Precision", items=PRECISION_ITEMS, default="auto",
                            description="Number precision of the model's networks: half precision is faster on a "
                                        "GPU; the surface is always computed in full precision")
    # Output. Defaults for a first run: the mesh as the model extracted it, vertex colours, no texture. That
    # is the quickest result and the one with the fewest steps that can fall back (on a CPU an unwrap and a
    # bake add tens of seconds), and at the extracted density the vertex colours already carry the image's
    # detail. A budget, quads or a texture are a deliberate next step, and Retopologize / Bake from Model
    # apply them later to the same field without running the model again.
    faces: IntProperty(name="Faces", default=0, min=0, max=MAX_FACES, soft_max=200_000, step=1000,
                       description="Reduce the mesh to about this many faces (0: as extracted). Colours are "
                                   "queried again from the model's field, not averaged from the dense mesh")
    quads: BoolProperty(name="Quads", default=False,
                        description="Remesh to mostly quads at the face count (falls back to triangles if the "
                                    "quad remesher fails; the panel says so)")
    texture: EnumProperty(name="Texture", items=TEXTURE_ITEMS, default="NONE",
                          description="Unwrap the mesh and bake a colour texture from the model's field (without a "
                                      "face budget the mesh is first reduced to about 50,000 faces, which an atlas "
                                      "can take); also the size Bake from Model uses")
    colours: EnumProperty(name="Colours", items=COLOURS_ITEMS, default="images",
                          description="Where the colours come from (stored on the object: Bake from Model and "
                                      "Retopologize use it again)")
    smooth_shading: BoolProperty(name="Smooth Shading", default=True)
    target_height: FloatProperty(name="Height", description="Scale the result to this height (0: model units)",
                                 default=0.0, min=0.0, soft_max=10.0, unit="LENGTH")

    # The outcome of the last job, shown in the panel (the job in flight is read from the session).
    last_error: StringProperty(name="Last Error")
    last_hint: StringProperty(name="Hint")
    last_info: StringProperty(name="Last Result")
    last_notes: StringProperty(name="Notes", description="What post-processing did or fell back from, one a line")


def register():
    bpy.utils.register_class(BatchImage)
    bpy.utils.register_class(ImageTo3DSettings)
    bpy.types.Scene.image_to_3d = PointerProperty(type=ImageTo3DSettings)


def unregister():
    del bpy.types.Scene.image_to_3d
    bpy.utils.unregister_class(ImageTo3DSettings)
    bpy.utils.unregister_class(BatchImage)
