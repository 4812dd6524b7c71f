"""Dense prediction with FEC (book chapter 13): a Semantic FPN head, the ``shapes``
segmentation task, its loss and training, and a torchvision detection backbone.

The paper transfers FEC to ADE20K semantic segmentation with Semantic FPN
(Kirillov et al. 2019) and to COCO detection with Mask R-CNN. Both only need what every
FEC backbone already exposes: four feature maps at strides 4, 8, 16 and 32, and their
channels in ``feature_info``::

    import timm, fec_core
    backbone = timm.create_model('fec_small_seg', features_only=True)   # centers 10,10,5,5
    backbone.feature_info.channels()    # [32, 64, 196, 320]
    backbone.feature_info.reduction()   # [4, 8, 16, 32]
    feats = backbone(images)            # 4 maps [B, C_i, H / s_i, W / s_i]

Valid input sizes: FEC's pooling layers halve even feature maps and its fold regions
must tile every map, so ``H`` and ``W`` should be multiples of 32 for the ``cls``, ``seg``
and ``det`` settings; a size whose maps do not divide raises a ``ValueError`` naming the
layer. (The stem, a stride-4 convolution as in the official code, drops up to 3 trailing
rows and columns, so 130x130 runs like 128x128; pad instead if every pixel matters.)
The center grids adapt to any size.

The modules, one concern each (every name is importable from ``fec_core.seg``):

* :mod:`~fec_core.seg.backbone`: the backbone's maps and channels, and
  :class:`FECBackboneWithFPN`, torchvision's ``BackboneWithFPN`` interface (Faster / Mask
  R-CNN, RetinaNet);
* :mod:`~fec_core.seg.head`: :class:`SemanticFPN` and :class:`FECSegmenter`;
* :mod:`~fec_core.seg.data`: the ``shapes`` segmentation task, :data:`SEG_CLASSES`;
* :mod:`~fec_core.seg.loss`: :func:`segmentation_loss`;
* :mod:`~fec_core.seg.training`: :data:`SEG_RECIPE` and :func:`train_segmentation`.

Chapter 13 shows the torchvision detector running and sketches configurations for
MMSegmentation, MMDetection and detectron2 (not run in the book).
"""
from ..train.metrics import IGNORE_INDEX, iou_per_class  # one IoU formula, shared with MeanIoU
from .backbone import FECBackboneWithFPN, backbone_fec, backbone_features, feature_channels
from .data import SEG_CLASSES, shapes_segmentation
from .head import FECSegmenter, SemanticFPN
from .loss import segmentation_loss
from .training import SEG_RECIPE, train_segmentation

__all__ = ["SEG_CLASSES", "IGNORE_INDEX", "SEG_RECIPE", "feature_channels", "backbone_features", "backbone_fec",
           "SemanticFPN", "FECSegmenter", "FECBackboneWithFPN", "shapes_segmentation", "iou_per_class",
           "segmentation_loss", "train_segmentation"]
