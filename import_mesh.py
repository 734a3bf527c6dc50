"""Build the generated object from the worker's .npz: the thin bpy side of ``backend.client.mesh_arrays``.

Triangles and quads, a ``Color`` attribute (always: it is what the vertex-colour material shows, and it
survives remeshing), and when the result is textured a UV map and a packed image named after the object.
"""

from __future__ import annotations

import bpy
import numpy as np

from .backend.client import mesh_arrays

COLOR_ATTRIBUTE = "Color"
UV_MAP = "UVMap"  # Blender's own default name, so other tools find it
SETTINGS_KEY = "image_to_3d"
MATERIAL_NAME = "Image to 3D"
# The stored placement maps the backend's frame (the model's box, about +-1) to the object's: its scale is the
# Height asked for over the model's height, 1 in model units. 1e-4..1e4 takes a unit model from 0.1 mm to 10 km
# tall, every scene's range; beyond it a bake's mesh reaches the backend at 1e4+ (or 1e30, or 0) times its box.
PLACEMENT_SCALES = (1e-4, 1e4)
# offset / scale is where the placement's origin (the model box's bottom centre) lies in the backend's frame,
# within about 1 of its origin; 1e3 is ample headroom and keeps the mesh far inside the backend's own bound.
MAX_PLACEMENT_REACH = 1e3
# Fixed node names: a later Bake from Model finds and reuses these nodes instead of stacking new ones.
TEXTURE_NODE = "Image to 3D Texture"
UV_NODE = "Image to 3D UV"


def load_npz(path) -> dict:
    """vertices, faces, colors, and uvs / texture when the result is textured (None otherwise)."""
    with np.load(path) as data:
        return {key: (data[key] if key in data else None)
                for key in ("vertices", "faces", "colors", "uvs", "texture")}


def build_mesh(name: str, vertices, faces, colors, target_height: float = 0.0, smooth: bool = True,
               uvs=None, place=None):
    """The mesh (not linked to anything yet) and its placement (scale, offset): object-local =
    backend_vertex * scale - offset. ``place`` reuses a placement instead of computing one."""
    arrays = mesh_arrays.prepare(vertices, faces, colors, target_height, uvs=uvs, place=place)
    mesh = bpy.data.meshes.new(name)
    try:
        fill_mesh(mesh, arrays, smooth)
    except Exception:
        bpy.data.meshes.remove(mesh)
        raise
    return mesh, (arrays.scale, arrays.offset)


def fill_mesh(mesh, arrays: mesh_arrays.MeshArrays, smooth: bool) -> None:
    mesh.vertices.add(len(arrays.positions) // 3)
    mesh.loops.add(len(arrays.corner_verts))
    mesh.polygons.add(len(arrays.loop_starts))
    # The attributes API with foreach_set: the fastest path (no per-element Python).
    mesh.attributes["position"].data.foreach_set("vector", arrays.positions)
    mesh.attributes[".corner_vert"].data.foreach_set("value", arrays.corner_verts)
    mesh.polygons.foreach_set("loop_start", arrays.loop_starts)  # the sizes follow from the starts
    mesh.update(calc_edges=True)

    color = mesh.color_attributes.new(COLOR_ATTRIBUTE, "FLOAT_COLOR", "POINT")
    color.data.foreach_set("color", arrays.rgba)  # linear values: FLOAT_COLOR stores scene-linear colour
    mesh.color_attributes.active_color = color
    mesh.color_attributes.render_color_index = mesh.color_attributes.active_color_index
    if arrays.uvs is not None:
        add_uv_map(mesh, arrays.uvs)
    # Set either way: new faces are smooth by default since Blender 4.1, flat before.
    mesh.polygons.foreach_set("use_smooth", np.full(len(arrays.loop_starts), bool(smooth)))
    mesh.update()


def add_uv_map(mesh, loop_uvs, name: str = UV_MAP):
    """A new UV map from one (u, v) per loop, made the active and the rendered one."""
    uv_map = mesh.uv_layers.new(name=name, do_init=False)
    if uv_map is None:  # Blender allows 8 UV maps
        raise RuntimeError(f"'{mesh.name}' has no room for another UV map")
    uv_map.data.foreach_set("uv", np.ascontiguousarray(loop_uvs, dtype=np.float32).ravel())
    mesh.uv_layers.active = uv_map
    uv_map.active_render = True
    return uv_map


def texture_image(name: str, texture) -> bpy.types.Image:
    """An sRGB image from (H, W, 3) bytes (top row first), packed into the .blend: the job folder that holds
    the worker's file is deleted next, and a packed texture travels with the file."""
    height, width = texture.shape[:2]
    pixels = mesh_arrays.texture_pixels(texture)
    image = bpy.data.images.new(name, width, height, alpha=False)
    try:
        image.colorspace_settings.name = "sRGB"
        image.pixels.foreach_set(pixels)
        image.pack()
        image.filepath_raw = f"//{bpy.path.clean_name(name)}.png"  # where Unpack writes it
    except Exception:
        bpy.data.images.remove(image)
        raise
    return image


def object_material(name: str = MATERIAL_NAME, image=None, uv_map: str = UV_MAP) -> bpy.types.Material:
    """A material whose base colour is the image (through ``uv_map``) when there is one, else the mesh's
    ``Color`` attribute. The attribute node is there either way, so switching back is one link."""
    material = bpy.data.materials.new(name)
    if bpy.app.version < (5, 0, 0):
        material.use_nodes = True  # always on (and deprecated) from 5.0
    nodes, links = material.node_tree.nodes, material.node_tree.links
    bsdf = principled(material)
    attribute = nodes.new("ShaderNodeVertexColor")
    attribute.layer_name = COLOR_ATTRIBUTE
    attribute.location = (bsdf.location.x - 300, bsdf.location.y)
    links.new(attribute.outputs["Color"], bsdf.inputs["Base Color"])
    bsdf.inputs["Roughness"].default_value = 0.8
    material.diffuse_color = (0.8, 0.8, 0.8, 1.0)
    if image is not None:
        link_texture(material, image, uv_map)
    return material


def vertex_color_material(name: str = MATERIAL_NAME) -> bpy.types.Material:
    return object_material(name)


def principled(material):
    return next((n for n in material.node_tree.nodes if n.type == "BSDF_PRINCIPLED"), None)


def link_texture(material, image, uv_map: str) -> None:
    """Image Texture (read through the named UV map) -> Base Color, replacing whatever fed Base Color."""
    nodes, links = material.node_tree.nodes, material.node_tree.links
    bsdf = principled(material)
    texture = nodes.get(TEXTURE_NODE) or nodes.new("ShaderNodeTexImage")
    texture.name = texture.label = TEXTURE_NODE
    texture.image = image
    texture.location = (bsdf.location.x - 320, bsdf.location.y + 260)
    uv = nodes.get(UV_NODE) or nodes.new("ShaderNodeUVMap")
    uv.name = uv.label = UV_NODE
    uv.uv_map = uv_map  # named, not "the active one": the texture stays right if another map becomes active
    uv.location = (texture.location.x - 220, texture.location.y - 80)
    links.new(uv.outputs["UV"], texture.inputs["Vector"])
    links.new(texture.outputs["Color"], bsdf.inputs["Base Color"])
    nodes.active = texture


def use_texture(obj, image, uv_map: str) -> bpy.types.Material:
    """Show ``image`` on ``obj``: its material's Base Color comes from the image from now on. A material that
    other meshes share is copied first (baking one object must not retexture another); an object without a
    usable material gets a new one."""
    material = obj.active_material
    if material is None or material.node_tree is None or principled(material) is None:
        material = object_material(obj.name, image, uv_map)
        if obj.material_slots:
            obj.active_material = material
        else:
            obj.data.materials.append(material)
        return material
    if material.users > 1:
        material = material.copy()
        obj.active_material = material
    link_texture(material, image, uv_map)
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


def new_object(name: str, mesh, settings: dict, image=None) -> bpy.types.Object:
    """The object with its material and settings, linked nowhere yet. A texture image takes the object's name
    (the object's, since Blender may have suffixed it)."""
    obj = bpy.data.objects.new(name, mesh)
    material = None
    try:
        if image is not None:
            image.name = obj.name
        material = object_material(image=image)
        mesh.materials.append(material)
        obj[SETTINGS_KEY] = settings  # how it was made, so it can be regenerated, re-baked and retopologized
    except Exception:
        discard(obj, material)
        raise
    return obj


def link_selected(obj, view_layer, collections) -> None:
    """Link into the collections, then make it the only selected object and the active one."""
    for collection in collections:
        collection.objects.link(obj)
    for other in view_layer.objects:
        if other.select_get(view_layer=view_layer):
            other.select_set(False, view_layer=view_layer)
    obj.select_set(True, view_layer=view_layer)
    view_layer.objects.active = obj


def add_object(scene: bpy.types.Scene, view_layer, collection, name: str, mesh, settings: dict,
               image=None, location=None) -> bpy.types.Object:
    """Link the object at ``location``, else at the 3D cursor (its lowest point there), selected and active."""
    obj = new_object(name, mesh, settings, image)
    try:
        obj.location = scene.cursor.location if location is None else location
        link_selected(obj, view_layer, [collection])
    except Exception:
        discard(obj, *mesh.materials)
        raise
    return obj


def discard(*ids) -> None:
    """Remove data-blocks made for an object that could not be added (None entries are skipped)."""
    homes = ((bpy.types.Object, bpy.data.objects), (bpy.types.Material, bpy.data.materials),
             (bpy.types.Mesh, bpy.data.meshes), (bpy.types.Image, bpy.data.images),
             (bpy.types.Collection, bpy.data.collections))
    for block in ids:
        for kind, home in homes:
            if isinstance(block, kind):
                try:
                    home.remove(block)
                except ReferenceError:  # already gone
                    pass
                break


def x_range(mesh) -> tuple[float, float]:
    """The mesh's extent along its local X axis ((0, 0) when it has no vertices)."""
    positions = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
    mesh.attributes["position"].data.foreach_get("vector", positions)
    xs = positions[0::3]
    return (float(xs.min()), float(xs.max())) if len(xs) else (0.0, 0.0)


def stored_settings(obj) -> dict | None:
    """What Image to 3D stored on an object it made, as a plain dict (None for other objects)."""
    if obj is None or SETTINGS_KEY not in obj:
        return None
    stored = obj[SETTINGS_KEY]
    return stored.to_dict() if hasattr(stored, "to_dict") else dict(stored)


def stored_placement(stored: dict):
    """(scale, offset) as stored on the object, or None for an object made before placements were stored.
    ValueError (naming what is wrong) for one no generation makes: a damaged or hand-edited .blend's, which
    would send a bake's mesh to 1e30 or NaN in the backend's frame (see :data:`PLACEMENT_SCALES`)."""
    if "placement_scale" not in stored or "placement_offset" not in stored:
        return None
    try:
        scale = float(stored["placement_scale"])
        offset = np.asarray(list(stored["placement_offset"]), dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("its stored placement is not numbers") from None
    low, high = PLACEMENT_SCALES
    if not low <= scale <= high:  # NaN fails this too
        raise ValueError(f"its placement_scale {scale:g} is outside {low:g} to {high:g}")
    if offset.shape != (3,) or not np.isfinite(offset).all():
        raise ValueError("its placement_offset is not three finite numbers")
    reach = float(np.abs(offset).max()) / scale
    if reach > MAX_PLACEMENT_REACH:
        raise ValueError(f"its placement_offset puts the model {reach:g} model units from the origin, beyond "
                         f"{MAX_PLACEMENT_REACH:g}")
    return scale, offset.astype(np.float32)
