"""Output › Colours (From Images / From Model, #22): sent with each generation, stored on the object, used again
by Bake from Model and Retopologize whatever the panel says now; the panel says how the picture was placed."""

import bpy

from .conftest import addon_module, panel_text
from .test_texture import bake_answer, generate, generate_answer, stand_in  # noqa: F401  (the stand-in worker)

VIEWS = [{"view": "picture", "camera": "model, framing fitted", "iou": 0.9712}]


def painted_answer():
    answer = generate_answer(textured=False)

    def with_views(request, output_dir):
        path, stats = answer(request, output_dir)
        return path, dict(stats, colours="images", views=VIEWS,
                          colour_sources={"vertices": {"picture": 0.4, "field": 0.6}})
    return with_views


def test_colours_default_to_images_and_travel_with_the_job(stand_in):
    settings = bpy.context.scene.image_to_3d
    assert settings.colours == "images"
    stand_in.answer = painted_answer()
    obj = generate(stand_in)
    assert stand_in.requests[-1]["options"]["colours"] == "images"
    stored = obj["image_to_3d"]
    assert stored["colours"] == "images"
    assert stored["colour_views"] == "picture: framing fitted, overlap 97%"
    assert "Painted from picture: framing fitted, overlap 97%" in panel_text()


def test_bake_from_model_and_retopologize_use_the_objects_choice(stand_in):
    settings = bpy.context.scene.image_to_3d
    settings.colours = "field"
    obj = generate(stand_in, textured=False)
    assert obj["image_to_3d"]["colours"] == "field"
    settings.colours = "images"  # the panel now says otherwise: the object's own choice is used
    stand_in.answer = bake_answer()
    settings.texture = "512"
    assert bpy.ops.image_to_3d.bake_from_model() == {"FINISHED"}
    assert stand_in.requests[-1]["options"]["colours"] == "field"
    job_options = addon_module("operators.job_options")
    assert job_options.stored_job_options({"model": "triposr"}, bpy.context)["colours"] == "field"  # an older object
    assert job_options.stored_job_options({"model": "triposr", "colours": "images"}, bpy.context)["colours"] == "images"
