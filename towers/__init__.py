"""ecomrec shared core: schemas, loaders, feature code and the towers.

Everything else (``training``, ``indexing``, ``serving``) builds on this package;
this package imports none of them.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
