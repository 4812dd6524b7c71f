"""The ``shapes`` segmentation task (chapter 13): every pixel is background or the class of
the shape it lies on."""
from __future__ import annotations

from ..data import SHAPE_CLASSES, shapes_datasets

__all__ = ["SEG_CLASSES", "shapes_segmentation"]

#: Classes of the ``shapes`` segmentation task: background, then the shapes.
SEG_CLASSES = ("background",) + tuple(SHAPE_CLASSES)


def shapes_segmentation(n_train: int = 1000, n_val: int = 200, size: int = 64, seed: int = 0):
    """The ``shapes`` segmentation task: ``(train, val)`` datasets of ImageNet-normalized images
    ``[3, size, size]`` and per-pixel classes ``[size, size]`` (0 background, ``1 + label`` on the
    shape: :data:`SEG_CLASSES`), built from :func:`fec_core.data.make_shapes`'s masks by
    :func:`fec_core.data.shapes_datasets` (``target='mask'``). Deterministic from ``seed``."""
    return shapes_datasets(n_train, n_val, size, seed, target="mask")
