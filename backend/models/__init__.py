"""Model families. Each module loads its official on-disk layout and exposes ``reconstruct``."""
