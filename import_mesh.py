"""Build the generated object from the worker's .npz: the thin bpy side of ``core.mesh_arrays``."""

from __future__ import annotations

import bpy
import numpy as np

from .core import mesh_arrays

COLOR_ATTRIBUTE = "Color"
SETTINGS_KEY = "image_to_3d"


def load_npz(path):
    with np.load(path) as data:
        return data["vertices"], data["faces"], data["colors"]


def build_mesh(name: str, vertices, faces, colors, target_height: float = 0.0, smooth: bool = True):
    positions, corner_verts, loop_starts, rgba = mesh_arrays.prepare(vertices, faces, colors, target_height)
    mesh = bpy.data.meshes.new(name)
    mesh.vertices.add(len(positions) // 3)
    mesh.loops.add(len(corner_verts))
    mesh.polygons.add(len(loop_starts))
    # The attributes API with foreach_set: the fastest path (no per-element Python).
    mesh.attributes["position"].data.foreach_set("vector", positions)
    mesh.attributes[".corner_vert"].data.foreach_set("value", corner_verts)
    mesh.polygons.foreach_set("loop_start", loop_starts)
    mesh.update(calc_edges=True)

    color = mesh.color_attributes.new(COLOR_ATTRIBUTE, "FLOAT_COLOR", "POINT")
    color.data.foreach_set("color", rgba)  # linear values: FLOAT_COLOR stores scene-linear colour
    mesh.color_attributes.active_color = color
    mesh.color_attributes.render_color_index = mesh.color_attributes.active_color_index
    # Set either way: new faces are smooth by default since Blender 4.1, flat before.
    mesh.polygons.foreach_set("use_smooth", np.full(len(loop_starts), bool(smooth)))
    mesh.update()
    return mesh


def vertex_color_material(name: str = "Image to 3D") -> bpy.types.Material:
    """A material whose base colour is the mesh's ``Color`` attribute."""
    material = bpy.data.materials.new(name)
    if bpy.app.version < (5, 0, 0):
        material.use_nodes = True  # always on (and deprecated) from 5.0
    nodes, links = material.node_tree.nodes, material.node_tree.links
    bsdf = next(n for n in nodes if n.type == "BSDF_PRINCIPLED")
    attribute = nodes.new("ShaderNodeVertexColor")
    attribute.layer_name = COLOR_ATTRIBUTE
    attribute.location = (bsdf.location.x - 300, bsdf.location.y)
    links.new(attribute.outputs["Color"], bsdf.inputs["Base Color"])
    bsdf.inputs["Roughness"].default_value = 0.8
    material.diffuse_color = (0.8, 0.8, 0.8, 1.0)
    return material


def keep_views(path: str, name: str) -> bpy.types.Image:
    """A multi-view model's six generated views as an image packed into the .blend (the job folder that holds
    the file is deleted next). A fake user keeps it when the file is saved, since nothing else uses it."""
    image = bpy.data.images.load(path, check_existing=False)
    try:
        image.name = name
        image.pack()
        image.filepath_raw = f"//{bpy.path.clean_name(name)}.png"  # where Unpack writes it, not the temp file
        image.use_fake_user = True
    except Exception:
        bpy.data.images.remove(image)
        raise
    return image


def add_object(scene: bpy.types.Scene, view_layer, collection, name: str, mesh, settings: dict) -> bpy.types.Object:
    """Link the object at the 3D cursor (its lowest point on the cursor), selected and active."""
    obj = bpy.data.objects.new(name, mesh)
    mesh.materials.append(vertex_color_material())
    obj.location = scene.cursor.location
    obj[SETTINGS_KEY] = settings  # how it was made, so it can be regenerated
    collection.objects.link(obj)
    for other in view_layer.objects:
        if other.select_get(view_layer=view_layer):
            other.select_set(False, view_layer=view_layer)
    obj.select_set(True, view_layer=view_layer)
    view_layer.objects.active = obj
    return obj
