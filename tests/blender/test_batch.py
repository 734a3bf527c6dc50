"""A batch of images in Blender, through the real worker and the tiny TripoSR model: one object per image in a
row from the 3D cursor, in a new collection, one warm worker, one undo step per object; Cancel keeps what
is done; a corrupt image is listed with its reason while the others are imported."""

import os
import time

import bpy
import numpy as np
import pytest

from .conftest import INPUT_IMAGE, addon_module, generate_module, jobs_module, panel_text, session

GAP = 0.1  # operators/results.py: between two neighbours, as a fraction of the wider one


def batch_module():
    return addon_module("operators.jobs")


def image_folder(tmp_path, names, corrupt=()):
    """A folder of copies of the test image (the ``corrupt`` ones cut short: an unreadable PNG)."""
    folder = tmp_path / "shots"
    folder.mkdir()
    data = INPUT_IMAGE.read_bytes()
    for name in names:
        (folder / name).write_bytes(data[:200] if name in corrupt else data)
    return folder


def choose(folder, names=()):
    """Open Batch as the file browser calls it: the folder and the files selected in it (none: all)."""
    return bpy.ops.image_to_3d.open_batch(directory=str(folder), files=[{"name": n} for n in names])


def job_root_entries():
    root = jobs_module().temp_root()
    return os.listdir(root) if os.path.isdir(root) else []


def drive(condition=lambda: False, timeout=300):
    """Run the ticks the timers would (they never fire in bpy-as-module), job after job, until the batch
    ends (True) or ``condition()`` holds (False). Returns that and the worker pids seen."""
    pids = set()
    deadline = time.monotonic() + timeout
    while jobs_module().TIMERS:
        if time.monotonic() > deadline:
            raise TimeoutError(jobs_module().TIMERS)
        if session().current() is not None:
            pids.add(session().current().pid)
        timer = next(iter(jobs_module().TIMERS.values()))
        if timer() is None:
            if bpy.app.timers.is_registered(timer):
                bpy.app.timers.unregister(timer)
        elif condition():
            return False, pids
        time.sleep(0.01)
    return True, pids


def world_x_bounds(obj):
    co = np.empty(len(obj.data.vertices) * 3, dtype=np.float32)
    obj.data.vertices.foreach_get("co", co)
    xs = co[0::3] + obj.location.x
    return float(xs.min()), float(xs.max())


def generated_objects():
    return sorted((o for o in bpy.data.objects if "image_to_3d" in o), key=lambda o: o.location.x)


def test_a_batch_of_three_in_a_row_in_a_new_collection_one_warm_worker_one_undo_step_each(settings, tmp_path):
    folder = image_folder(tmp_path, ["a.png", "b.png", "c.png"])
    assert choose(folder, ["c.png", "a.png", "b.png"]) == {"FINISHED"}
    assert [os.path.basename(item.filepath) for item in settings.batch] == ["a.png", "b.png", "c.png"]
    assert settings.batch_name == "Batch a +2"
    bpy.context.scene.cursor.location = (1.0, -2.0, 0.5)
    bpy.ops.ed.undo_push(message="before")

    assert bpy.ops.image_to_3d.generate(run_async=True) == {"FINISHED"}
    ended, pids = drive()
    assert ended and len(pids) == 1, "every image ran in the same warm worker"

    objs = generated_objects()
    assert [o.name for o in objs] == ["a 3D", "b 3D", "c 3D"]
    collection = bpy.data.collections["Batch a +2"]
    assert set(collection.objects) == set(objs) and all(o.users_collection == (collection,) for o in objs)
    assert collection in bpy.context.scene.collection.children[:]
    assert tuple(objs[0].location) == pytest.approx((1.0, -2.0, 0.5)), "the first stands on the 3D cursor"
    for left, right in zip(objs, objs[1:]):
        assert tuple(right.location)[1:] == pytest.approx((-2.0, 0.5))
        (low_l, high_l), (low_r, high_r) = world_x_bounds(left), world_x_bounds(right)
        gap = GAP * max(high_l - low_l, high_r - low_r)
        assert low_r - high_l == pytest.approx(gap, abs=1e-4), "spaced by its bounds plus a gap"
    for obj, name in zip(objs, ["a.png", "b.png", "c.png"]):
        stored = obj["image_to_3d"].to_dict()
        assert stored["image"] == name and stored["resolution"] == 64
        image = bpy.data.images[name]
        assert image.use_fake_user, "its source image stays in the file (Bake from Model needs it)"
        assert bpy.path.abspath(image.filepath) == str(folder / name)
    assert settings.last_info == "3 of 3 imported" and settings.last_error == ""
    assert bpy.context.active_object == objs[-1]
    assert job_root_entries() == []
    assert bpy.ops.image_to_3d.generate.poll(), "the batch is over"

    # One undo step per object, the last one first; the first one's step takes the collection with it.
    assert bpy.ops.ed.undo() == {"FINISHED"}
    assert [o.name for o in generated_objects()] == ["a 3D", "b 3D"]
    assert bpy.ops.ed.undo() == {"FINISHED"}
    assert bpy.ops.ed.undo() == {"FINISHED"}
    assert generated_objects() == [] and "Batch a +2" not in bpy.data.collections


def test_cancel_after_the_first_keeps_it_and_leaves_no_job_folders(settings, tmp_path):
    settings.resolution = 256  # seconds of surface extraction per image: time to cancel the second
    folder = image_folder(tmp_path, ["img1.png", "img2.png", "img10.png"])
    assert choose(folder) == {"FINISHED"}, "no file selected: every image in the folder"
    assert settings.batch_name == "shots" and len(settings.batch) == 3

    assert bpy.ops.image_to_3d.generate(run_async=True) == {"FINISHED"}
    assert not bpy.ops.image_to_3d.generate.poll(), "one batch at a time"

    def second_extracting():
        job = session().current_job()
        return len(generated_objects()) == 1 and job is not None and job.stage == "extracting_surface"

    ended, pids = drive(second_extracting)
    assert not ended
    assert "Image 2 of 3 · Extracting surface" in panel_text()
    pid = session().current().pid
    assert bpy.ops.image_to_3d.cancel() == {"FINISHED"}
    ended, _ = drive(timeout=60)
    assert ended

    assert [o.name for o in generated_objects()] == ["img1 3D"], "the finished object stays"
    assert list(bpy.data.collections["shots"].objects) == generated_objects()
    assert settings.last_info == "1 of 3 imported, 2 cancelled" and settings.last_error == ""
    assert "img2.png" not in bpy.data.images and "img10.png" not in bpy.data.images
    assert session().current() is None, "a cancel stops the worker (as for a single image)"
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert job_root_entries() == [], "no job folder left"
    assert bpy.ops.image_to_3d.generate.poll()


def test_a_corrupt_image_in_the_middle_is_listed_and_the_others_are_imported(settings, tmp_path):
    folder = image_folder(tmp_path, ["a.png", "b.png", "c.png"], corrupt={"b.png"})
    assert choose(folder, ["a.png", "b.png", "c.png"]) == {"FINISHED"}
    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}  # background mode: runs the whole batch

    objs = generated_objects()
    assert [o.name for o in objs] == ["a 3D", "c 3D"]
    assert set(bpy.data.collections["Batch a +2"].objects) == set(objs)
    assert world_x_bounds(objs[1])[0] > world_x_bounds(objs[0])[1], "the next in the row, no hole"
    ((name, reason),) = batch_module().current_batch().failures
    assert name == "b.png" and "could not be decoded" in reason
    assert settings.last_info == "2 of 3 imported, 1 failed" and settings.last_error == ""
    assert "b.png" not in bpy.data.images, "nothing of the failed image is left in the file"
    text = panel_text()
    assert "Failed: 1 of 3" in text and "b.png: " in text and "could not be decoded" in text
    assert job_root_entries() == []

    bpy.ops.image_to_3d.clear_batch()
    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}
    assert batch_module().current_batch() is None and "Failed" not in panel_text(), "kept until the next Generate"


def test_a_batch_where_every_image_fails_leaves_no_collection(settings, tmp_path):
    folder = image_folder(tmp_path, ["x.png", "y.png"], corrupt={"x.png", "y.png"})
    assert choose(folder) == {"FINISHED"}
    with pytest.raises(RuntimeError, match="0 of 2 imported, 2 failed"):
        bpy.ops.image_to_3d.generate()
    assert len(bpy.data.collections) == 0 and generated_objects() == []
    assert settings.last_error == "0 of 2 imported, 2 failed" and settings.last_hint
    assert len(batch_module().current_batch().failures) == 2
    assert job_root_entries() == []


def test_a_single_image_run_makes_no_collection(settings):
    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}
    (obj,) = generated_objects()
    assert len(bpy.data.collections) == 0 and obj.users_collection == (bpy.context.scene.collection,)
    assert tuple(obj.location) == pytest.approx(tuple(bpy.context.scene.cursor.location))


def test_choosing_a_batch(settings, tmp_path):
    folder = image_folder(tmp_path, ["b10.png", "b9.png", "B1.jpg", "notes.txt", ".hidden.png"])
    (folder / "sub.png").mkdir()
    assert choose(folder) == {"FINISHED"}
    assert [os.path.basename(i.filepath) for i in settings.batch] == ["B1.jpg", "b9.png", "b10.png"]
    text = panel_text()
    assert "shots: 3 images" in text and "Generate 3D (3 images)" in text and "clear_batch" in text
    assert "template_ID" not in text, "the single-image picker gives way to the batch"

    settings.image = None
    assert generate_module().why_not(bpy.context) == "", "a batch needs no single image"

    assert bpy.ops.image_to_3d.clear_batch() == {"FINISHED"}
    assert len(settings.batch) == 0 and not bpy.ops.image_to_3d.clear_batch.poll()
    assert generate_module().why_not(bpy.context) == "Choose an image first"

    assert choose(folder, ["b9.png"]) == {"FINISHED"}, "one file chosen: the single image"
    assert len(settings.batch) == 0 and settings.image.name == "b9.png"

    assert choose(folder, ["b9.png", "b10.png"]) == {"FINISHED"}
    assert settings.batch_name == "Batch b9 +1"
    assert bpy.ops.image_to_3d.open_image(filepath=str(INPUT_IMAGE)) == {"FINISHED"}
    assert len(settings.batch) == 0, "opening one image leaves the batch"

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="No images in"):
        choose(empty)
