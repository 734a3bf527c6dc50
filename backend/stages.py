"""Stage names of the one pipeline, as they appear on the wire, in the --json summary and in the panel.

A leaf module (no imports) so that the pipeline, the models, the post-processing and the Blender side can
all import it without a circle through ``pipeline``.
"""

LOAD = "loading_model"
BACKGROUND = "removing_background"
VIEWS = "generating_views"
ENCODE = "encoding"
TRIPLANE = "building_triplanes"
FIELD = "recomputing_field"  # a cached field is gone: the image is encoded again (the usual stages follow)
SURFACE = "extracting_surface"
COLOR = "colouring"
REDUCE = "reducing"  # also the quad remeshing
UNWRAP = "unwrapping"
BAKE = "baking_texture"
QUEUED = "waiting_in_queue"  # a shared server (cluster-serve) whose GPUs are all busy: the message says the place

ALL = (BACKGROUND, LOAD, VIEWS, ENCODE, TRIPLANE, FIELD, SURFACE, COLOR, REDUCE, UNWRAP, BAKE, QUEUED)
