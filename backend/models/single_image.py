"""The shape every single-image model (TripoSR, OpenLRM) shares: image -> field -> surface."""


class SingleImageModel:
    """What the single-image models (TripoSR, OpenLRM) share: ``make_planes`` (image -> field) and ``mesh_from``
    (field -> surface) make :meth:`reconstruct`."""

    def reconstruct(self, conditioning, options, stages):
        """The image's mesh, as extracted (the pipeline adds the post-processing)."""
        planes, used = self.make_planes(conditioning, options, stages)
        mesh = self.mesh_from(planes, options, stages)
        mesh.stats.update(used)
        return mesh
