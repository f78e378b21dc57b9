"""Loaders for the shop's data: S3-Rec sequential files, UCI Online Retail, CDNOW, generic tables.

:func:`load_dataset` resolves a dataset by name (``beauty``, ``online-retail``, ``cdnow``,
``cdnow-sample``, ``synthetic``) or by path (an S3-Rec prefix such as
``/data/amazon_s3rec/Sports``; a saved :class:`~intake.dataset.Dataset` directory).
"""

from intake.loaders.registry import DATASETS, load_dataset, resolve_data_dir

__all__ = ["DATASETS", "load_dataset", "resolve_data_dir"]
