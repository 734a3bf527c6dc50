"""The shape every single-image model (TripoSR, OpenLRM) shares: image -> field -> surface."""

from __future__ import annotations

from .. import devices


class SingleImageModel:
    """What the single-image models (TripoSR, OpenLRM) share. Each gives ``model_input`` (the prepared image as
    its encoder takes it, and the source size), ``planes_of`` (that input -> triplanes, reporting its stages) and
    ``mesh_from`` (field -> surface); here they make :meth:`make_planes` and :meth:`reconstruct`."""

    def make_planes(self, conditioning, options, stages):
        """The prepared image -> this object's triplanes (3, C, H, W) in fp32, and what was used.

        Half precision (autocast) for the image encoder, the transformer and its upsampler only; the planes come
        back as fp32, and the decoder, the surface and the colours run in fp32 (PRECISION_NOTE in triposr.py)."""
        model_input, size = self.model_input(conditioning, options)
        dtype = devices.resolve_precision(options.precision, self.device)
        with devices.autocast(self.device, dtype):
            planes = self.planes_of(model_input, stages)
        return planes.float(), {"source_size": size, "precision": devices.precision_name(dtype)}

    def reconstruct(self, conditioning, options, stages):
        """The image's mesh, as extracted (the pipeline adds the post-processing)."""
        planes, used = self.make_planes(conditioning, options, stages)
        mesh = self.mesh_from(planes, options, stages)
        mesh.stats.update(used)
        return mesh
