"""vtab: evaluate frozen vision backbones through a filesystem work queue."""

__version__ = "0.1.0"
