"""A .blend whose stored placement is not one (a placement_scale of 1e-30, a NaN or infinite offset: a
damaged or hostile file) refuses Bake from Model and Retopologize with a clear reason, and sends nothing: such
a placement would take the bake's mesh to 1e30 in the backend's frame, where the atlas never ends (#20)."""

import math

import bpy
import pytest

from .conftest import addon_module, jobs_module, leftover_files, session
from .test_texture import bake_answer, generate, stand_in  # noqa: F401  (the stand-in worker fixture)

BAD_PLACEMENTS = [
    ("placement_scale", 1e-30, "placement_scale 1e-30 is outside 0.0001 to 10000"),
    ("placement_scale", 1e30, "placement_scale 1e+30 is outside 0.0001 to 10000"),
    ("placement_scale", math.nan, "placement_scale nan is outside 0.0001 to 10000"),
    ("placement_scale", -1.0, "placement_scale -1 is outside 0.0001 to 10000"),
    ("placement_scale", "small", "placement is not numbers"),
    ("placement_offset", [math.nan, 0.0, 0.0], "placement_offset is not three finite numbers"),
    ("placement_offset", [0.0, math.inf, 0.0], "placement_offset is not three finite numbers"),
    ("placement_offset", [0.0, 0.0], "placement_offset is not three finite numbers"),
    ("placement_offset", [0.0, 0.0, 1e9], "placement_offset puts the model 1e+09 model units from"),
]


def saved_and_opened(tmp_path, key, value):
    """The generated object with ``key`` set to ``value``, through a saved .blend opened again."""
    obj = bpy.context.active_object
    obj["image_to_3d"][key] = value
    path = str(tmp_path / "damaged.blend")
    assert bpy.ops.wm.save_as_mainfile(filepath=path) == {"FINISHED"}
    assert bpy.ops.wm.open_mainfile(filepath=path) == {"FINISHED"}
    obj = bpy.context.active_object
    assert obj is not None and "image_to_3d" in obj
    return obj


@pytest.mark.parametrize("key, value, reason", BAD_PLACEMENTS, ids=[f"{k}={v}" for k, v, _ in BAD_PLACEMENTS])
def test_a_stored_placement_out_of_bounds_refuses_bake_and_retopologize(stand_in, tmp_path, monkeypatch,  # noqa: F811
                                                                        key, value, reason):
    generate(stand_in, textured=False)
    obj = saved_and_opened(tmp_path, key, value)
    bpy.context.scene.image_to_3d.faces = 1000  # so that only the placement stands in Retopologize's way
    sent = len(stand_in.requests)
    started = []
    monkeypatch.setattr(session(), "worker_for", lambda *args, **kwargs: started.append(args) or stand_in)

    bake = addon_module("operators.bake")
    retopo = addon_module("operators.retopologize")
    for why_not in (bake.why_not, retopo.why_not):
        message = why_not(bpy.context)
        assert message.startswith(f"'{obj.name}' has a damaged placement") and reason in message
        assert message.endswith("generate it again")
    assert not bpy.ops.image_to_3d.bake_from_model.poll() and not bpy.ops.image_to_3d.retopologize.poll()
    for operator in (bpy.ops.image_to_3d.bake_from_model, bpy.ops.image_to_3d.retopologize):
        with pytest.raises(RuntimeError, match="damaged placement"):
            operator()
    assert len(stand_in.requests) == sent and started == [], "nothing reached a backend"
    assert jobs_module().TIMERS == {} and leftover_files() == []
    assert bpy.context.scene.image_to_3d.last_error == ""


def test_a_sound_placement_at_the_bounds_still_bakes(stand_in, tmp_path):  # noqa: F811
    generate(stand_in, textured=False)
    obj = saved_and_opened(tmp_path, "placement_scale", 1e-4)
    obj["image_to_3d"]["placement_offset"] = [0.0, 0.0, -0.05]  # 500 model units at this scale: inside 1000
    stand_in.answer = bake_answer()
    assert bpy.ops.image_to_3d.bake_from_model() == {"FINISHED"}
    assert stand_in.requests[-1]["op"] == "bake"
