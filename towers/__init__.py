"""Features and models: sequence features (``sequences``), the item, user and basket
towers, the factor (ALS/EASE) towers, the text encoder, and their inference and ONNX export.

Builds on ``intake`` (the canonical frames) and ``ecomrec.errors`` / ``ecomrec.config``;
imports nothing else of ours.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
