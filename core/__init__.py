"""bpy-free helpers of the Blender side (numpy + stdlib only), tested with plain pytest."""
