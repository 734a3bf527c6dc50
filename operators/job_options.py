"""A request's options from the panel's settings and the preferences, or from the settings stored on an object.

May import the root modules (preferences, properties) and ``backend.client``.
"""

from __future__ import annotations

import os

import bpy

from .. import preferences, properties
from ..backend.client import catalog
from .results import FIELD_SETTINGS


def model_folder(weights_dir: str, model: str) -> str | None:
    """The Model Folder preference for this model: its sub-folder named like the model id, or the folder
    itself when it holds the model's files. None lets the backend search the model store, then the Hugging
    Face cache (so a Model Folder holding only some models does not hide the others)."""
    if not weights_dir:
        return None
    folder = catalog.user_folder_for(model, bpy.path.abspath(weights_dir))
    return os.path.abspath(folder) if folder is not None else None


def job_options(settings, prefs) -> dict:
    """What the worker is sent: None where the model's own default applies, nothing the model cannot use
    (the backend refuses those)."""
    device = job_device(settings, prefs)
    options = {
        "model": settings.model,
        "weights": model_folder(prefs.weights_dir if prefs else "", settings.model),
        "resolution": int(settings.resolution) if settings.use_custom_resolution else None,
        "foreground_ratio": round(float(settings.foreground_ratio), 4) if settings.use_custom_foreground_ratio
        else None,
        "remove_background": bool(settings.remove_background),
        "device": device,
        "precision": settings.precision,
    }
    if catalog.uses_threshold(settings.model):
        options["threshold"] = round(float(settings.threshold), 6) if settings.use_custom_threshold else None
    if catalog.draws_samples(settings.model):
        options.update(steps=int(settings.steps), guidance=round(float(settings.guidance), 4), seed=int(settings.seed))
    else:
        options["source_size"] = int(settings.source_size) or None
    options.update(properties.output_options(settings), colours=settings.colours)
    return options


def job_device(settings, prefs) -> str:
    return settings.device if settings.device != "DEFAULT" else (prefs.device if prefs else "auto")


def stored_job_options(stored: dict, context) -> dict:
    """A request's options from the settings stored on a generated object. Where the weights are and which
    device runs them are this machine's, from the preferences and the panel now (a file made on a GPU machine
    can be re-baked on a laptop); everything that shapes the field is the object's."""
    settings, prefs = context.scene.image_to_3d, preferences.get(context)
    options = {name: stored[name] for name in FIELD_SETTINGS if name in stored}
    options["weights"] = model_folder(prefs.weights_dir if prefs else "", options.get("model", ""))
    options["device"] = job_device(settings, prefs)
    options["precision"] = settings.precision  # like the device: this machine's choice now
    if stored.get("field_id"):
        options["field_id"] = str(stored["field_id"])
    # The object's own choice; made before colours could be painted: the model's, as they were then.
    options["colours"] = str(stored.get("colours", "field"))
    return options


def generation_settings(settings, options: dict) -> dict:
    """What is stored on a generated object, but its image: the values sent, the model's defaults where None
    was sent (the result's own report of what it used replaces these, see result_settings)."""
    return dict(properties.effective(settings), **{k: v for k, v in options.items() if v is not None},
                smooth_shading=bool(settings.smooth_shading), target_height=float(settings.target_height))
