"""Model families, one small file per part: each loads its official on-disk layout strictly and turns an image
(or views) into a field and a surface. ``registry`` describes them all (files, licences, defaults) and is
import-light: Blender reads it through the client.

May import the engine below the pipeline (``surface``, ``field``, ``mesh``, ``progress``, ``options``,
``protocol``, ``errors``, ``preprocess``, ``hub``); never ``pipeline``, an entry point or the client.
"""
