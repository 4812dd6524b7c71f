"""Reading the clusters (book chapter 11): trace FEC's assignments back to the pixels.

Every clustering layer of FEC records, for each point of its input feature map,
the center it joined (:meth:`fec_core.FEC.forward_with_clusters`). This module
turns those records into **label maps at image resolution**:

* the **stem** cuts the image into ``4x4`` patches, one point each
  (``56x56`` points at 224x224);
* a **pooling** layer sends every point to one of ``N/4`` representatives, so a
  pixel's cluster after pooling layer ``k`` is the *composition* of the
  assignments of pools ``1..k``, starting from the pixel's stem patch
  (``56x56 -> 28x28 -> 14x14 -> 7x7`` representatives at 224);
* an **encode** layer (one per block, per head) assigns every point of its stage's
  map to one of ``proposal`` centers per fold region; a pixel's cluster is the
  cluster of the stage point that the pooling hierarchy led it to.

:func:`trace_clusters` does this for any input size and folding. :func:`merge_regions`
merges the final representatives into ``k`` regions with scikit-learn's k-means
(:cite:`lloyd1982kmeans`) on their features; :func:`paper_regions` does it as the
official ``cluster_visualize.py`` draws the paper's figures (key centers of the last
pooling layer as they are (not unit vectors), non-empty clusters, one start).

What the regions are good for, an unsupervised foreground segmentation, its classical
baseline and their evaluation, is :mod:`fec_core.foreground`, which builds on this module.
The k-means both use is :mod:`fec_core.regions`.

Shapes: ``B`` batch, ``H x W`` an image (rows x columns), ``rows x cols`` a layer's feature
map (row-major point index ``r * cols + c``); a record's assignment
``[B, (heads,) fold_w, fold_h, w, h]`` in the official code's letters, as everywhere in
fec_core: ``fold_w x fold_h`` regions of ``w`` rows and ``h`` columns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .model import FEC
from .records import ClusterRecord, stage_and_block
from .regions import kmeans_labels, number_by_area, one_thread

__all__ = ["LayerMap", "stem_points", "pool_parents", "encode_clusters", "trace", "trace_clusters",
           "merge_regions", "pool_key_centers", "paper_regions"]

@dataclass
class LayerMap:
    """The clusters of one layer, as a label map at image resolution.

    ``labels``: LongTensor ``[B, H, W]``; two pixels share a label iff they are in the
    same cluster of this layer (labels are unique over the whole image: fold
    regions get disjoint label ranges). ``num_clusters``: how many labels the layer
    can produce (``points`` for the stem and the pools: the size of the layer's
    output map; ``fold regions x centers`` for encode layers). ``head``: the
    encode head (``None`` for the stem and the pools). ``grid``: how the layer's clusters
    are laid out: its output map ``(rows, cols)`` for the stem and the pools (a cluster per output
    point), one fold region's center grid (the record's ``proposal``) for encode layers.
    """

    name: str
    kind: str
    stage: int
    labels: torch.Tensor
    num_clusters: int
    grid: Tuple[int, int]
    head: Optional[int] = None

    @property
    def title(self) -> str:
        """A short panel title, e.g. ``pool 2 (14x14)`` or ``s1.b0 head 0``."""
        if self.kind == "stem":
            return f"stem ({self.grid[0]}x{self.grid[1]})"
        if self.kind == "pool":
            return f"pool {self.stage} ({self.grid[0]}x{self.grid[1]})"
        block = stage_and_block(self.name)[1]
        block = "?" if block is None else block
        head = "" if self.head is None else f" h{self.head}"
        return f"s{self.stage}.b{block}{head}"

    def used(self) -> torch.Tensor:
        """Number of distinct labels actually present per image, LongTensor ``[B]``."""
        return torch.tensor([int(torch.unique(lab).numel()) for lab in self.labels])


# ---------------------------------------------------------------------------- one layer
def stem_points(height: int, width: int, patch: int = 4, device=None) -> torch.Tensor:
    """Every pixel's stem point: LongTensor ``[H, W]`` of row-major indices into the
    ``(H // patch) x (W // patch)`` map of the stem (chapter 2).

    The stem's stride-``patch`` convolution drops the last ``H mod patch`` rows and
    ``W mod patch`` columns; those pixels are given to the nearest patch.
    """
    rows, cols = height // patch, width // patch
    if rows < 1 or cols < 1:
        raise ValueError(f"image {height}x{width} is smaller than one {patch}x{patch} stem patch")
    row = (torch.arange(height, device=device) // patch).clamp(max=rows - 1)
    col = (torch.arange(width, device=device) // patch).clamp(max=cols - 1)
    return row[:, None] * cols + col[None, :]


def pool_parents(record: ClusterRecord) -> torch.Tensor:
    """Where each point goes in one pooling layer (Eq. 5, chapter 8).

    ``record.index`` ``[B, fold_w, fold_h, w, h]`` (``fold_w x fold_h`` regions of
    ``w x h`` points; the value is the region-local center index, row-major over the
    region's ``(w/2) x (h/2)`` center grid) -> LongTensor ``[B, rows * cols]``: for every point
    of the input map (``rows = fold_w * w``, ``cols = fold_h * h``, row-major) the row-major
    index of its representative in the ``(rows/2) x (cols/2)`` output map.
    """
    if record.kind != "pool":
        raise ValueError(f"{record.name} is an {record.kind} layer, not a pooling layer")
    idx = record.index
    b, fold_w, fold_h, w, h = idx.shape
    gw, gh = w // 2, h // 2  # one region's center grid
    dev = idx.device
    crow = idx // gh + torch.arange(fold_w, device=dev).view(1, fold_w, 1, 1, 1) * gw
    ccol = idx % gh + torch.arange(fold_h, device=dev).view(1, 1, fold_h, 1, 1) * gh
    parent = crow * (fold_h * gh) + ccol  # [B, fold_w, fold_h, w, h]
    return parent.permute(0, 1, 3, 2, 4).reshape(b, fold_w * w * fold_h * h)


def encode_clusters(record: ClusterRecord) -> torch.Tensor:
    """The clusters of one encode layer (Eq. 5, chapter 5), per head.

    ``record.index`` ``[B, E, fold_w, fold_h, w, h]`` -> LongTensor ``[B, E, rows * cols]``
    (row-major over the layer's whole map): region ``(i, j)``'s center ``m`` gets the label
    ``(i * fold_h + j) * M + m`` with ``M`` centers per region.
    """
    if record.kind != "encode":
        raise ValueError(f"{record.name} is a {record.kind} layer, not an encode layer")
    idx = record.index
    b, e, fold_w, fold_h, w, h = idx.shape
    region = torch.arange(fold_w * fold_h, device=idx.device).view(1, 1, fold_w, fold_h, 1, 1)
    labels = idx + region * record.num_centers
    return labels.permute(0, 1, 2, 4, 3, 5).reshape(b, e, fold_w * w * fold_h * h)


# ---------------------------------------------------------------------------- the hierarchy
def trace(records: Sequence[ClusterRecord], image_size: Tuple[int, int], patch: int = 4,
          heads: Optional[Sequence[int]] = None) -> List[LayerMap]:
    """Compose the assignments of a forward pass into label maps at image resolution.

    ``records``: :meth:`FEC.forward_with_clusters`'s list (forward order, batch ``B``);
    ``image_size``: ``(H, W)`` of the input. Returns, in forward order, one
    :class:`LayerMap` for the stem, one per pooling layer and one per encode layer and
    head (``heads``: which heads to keep, all by default). A pixel's label at pooling
    layer ``k`` is ``parents_k[... parents_1[stem(pixel)]]``; at an encode layer of stage
    ``s`` it is that layer's cluster of the stage-``s`` point the pixel reached.
    """
    height, width = image_size
    if not records:
        raise ValueError("no cluster records: run model.forward_with_clusters(x) first")
    b = records[0].index.shape[0]
    dev = records[0].index.device
    hs, ws = height // patch, width // patch
    pos = stem_points(height, width, patch, dev).reshape(1, -1).expand(b, -1)  # [B, H*W] point per pixel
    maps = [LayerMap("stem", "stem", 0, pos.reshape(b, height, width).clone(), hs * ws, (hs, ws))]
    for r in records:
        if r.kind == "pool":
            _, fold_w, fold_h, w, h = r.index.shape
            if (fold_w * w, fold_h * h) != (hs, ws):
                raise ValueError(f"{r.name}: input map {fold_w * w}x{fold_h * h} does not follow the previous "
                                 f"layer's {hs}x{ws}; are the records from one forward pass of one input?")
            pos = torch.gather(pool_parents(r), 1, pos)
            hs, ws = hs // 2, ws // 2
            maps.append(LayerMap(r.name, "pool", r.stage, pos.reshape(b, height, width), hs * ws, (hs, ws)))
        elif r.kind == "encode":
            lab = encode_clusters(r)  # [B, E, rows * cols]
            if lab.shape[-1] != hs * ws:
                raise ValueError(f"{r.name}: map of {lab.shape[-1]} points, expected {hs}x{ws}")
            keep = range(lab.shape[1]) if heads is None else [e for e in heads if e < lab.shape[1]]
            n = r.num_centers * r.index.shape[2] * r.index.shape[3]
            for e in keep:
                pix = torch.gather(lab[:, e], 1, pos).reshape(b, height, width)
                maps.append(LayerMap(r.name, "encode", r.stage, pix, n, tuple(r.proposal), head=e))
        else:
            raise ValueError(f"unknown record kind {r.kind!r}")
    return maps


@torch.no_grad()
def trace_clusters(model: FEC, x: torch.Tensor, heads: Optional[Sequence[int]] = None
                   ) -> Tuple[torch.Tensor, List[LayerMap], List[torch.Tensor]]:
    """One forward pass of ``model`` on ``x`` ``[B, 3, H, W]`` with every cluster traced to the pixels.

    Returns ``(output, maps, stage_features)``: the model's output, the
    :class:`LayerMap` list of :func:`trace` and every stage's output features
    ``[B, C_s, rows_s, cols_s]`` (the representatives, as updated by the stage's blocks:
    :meth:`FEC.forward_intermediates`, through the per-stage GroupNorms when the model is ``dense``;
    ``stage_features[-1]`` are the final representatives that :func:`merge_regions` merges).
    """
    if not isinstance(model, FEC):
        raise TypeError(f"trace_clusters needs an fec_core FEC model, got {type(model).__name__}")
    model.check_input(x)
    feats, records = model.forward_with_clusters(x, intermediates=True)
    # forward_features is the final norm of the last stage output (an identity when dense:
    # the last stage's output norm already ran), so this is model(x) without a second pass
    out = model.forward_head(model.norm(feats[-1]))
    return out, trace(records, tuple(x.shape[-2:]), heads=heads), feats


# ---------------------------------------------------------------------------- merging
def merge_regions(features: torch.Tensor, labels: torch.Tensor, k: int, seed: int = 0,
                  unit: bool = True, n_init: int = 10, nonempty: bool = False) -> torch.Tensor:
    """Merge representatives into ``k`` regions with k-means (scikit-learn).

    ``features`` ``[B, C, rows, cols]``: one vector per representative (e.g. the last stage's
    output, or :func:`pool_key_centers`); ``labels`` ``[B, H, W]``: every pixel's
    representative (row-major index into ``rows x cols``, the last pooling layer's
    :attr:`LayerMap.labels`). Per image, k-means with ``k`` clusters runs on the feature
    vectors (their unit vectors when ``unit``, as :func:`fec_core.clustering.unit` gives them:
    FEC compares points by cosine; ``n_init``
    starts, the best kept) and each pixel takes its representative's region. With
    ``nonempty`` only the representatives that some pixel joined take part, and when
    there are at most ``k`` of them each is its own region (no k-means).
    Returns LongTensor ``[B, H, W]`` with values in ``0..k-1``. Regions are numbered by
    decreasing area, so the labels do not depend on k-means' arbitrary order.

    The official ``cluster_visualize.py`` (the paper's figures) is :func:`paper_regions`:
    this function on the last pooling layer's *key centers*, ``unit=False``,
    ``n_init=1``, ``nonempty=True``. The defaults here (the last stage's
    representatives as unit vectors, 10 starts, all representatives) are this library's
    variant; chapter 11 compares the two.
    """
    b, c, rows, cols = features.shape
    if labels.shape[0] != b:
        raise ValueError(f"features for {b} images, labels for {labels.shape[0]}")
    n = rows * cols
    if int(labels.max()) >= n or int(labels.min()) < 0:
        raise ValueError(f"labels must index the {rows}x{cols} representatives; got values up to {int(labels.max())}")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} regions from {n} representatives: choose 1 <= k <= {n}")
    feats = features.detach().float().flatten(2).transpose(1, 2).cpu()  # [B, hw, C]
    if unit:  # F.normalize: unit() up to rounding, and the k-means numbers of chapter 11 rest on it
        feats = F.normalize(feats, dim=-1)
    out = torch.empty_like(labels)
    with one_thread():
        for i in range(b):
            used = torch.unique(labels[i]).cpu() if nonempty else torch.arange(n)
            if nonempty and len(used) <= k:
                part = torch.arange(len(used))
            else:
                part = torch.from_numpy(kmeans_labels(feats[i][used].numpy(), k, seed, n_init)).long()
            region = torch.zeros(n, dtype=torch.long)
            region[used] = part
            out[i] = number_by_area(region.to(labels.device)[labels[i]], k)
    return out


@torch.no_grad()
def pool_key_centers(model: FEC, x: torch.Tensor, stage: int = -1) -> torch.Tensor:
    """The key centers of a pooling layer (Eq. 4, chapters 3 and 8): the layer's keys
    ``conv_f(input)`` average-pooled over its ``2x2`` windows, ``[B, C, rows, cols]`` with
    ``rows x cols`` the layer's output map. ``stage``: the stage whose pooling layer (1..3, or
    -1 for the last). One forward pass of ``model`` on ``x`` ``[B, 3, H, W]``."""
    pools = [s.downsample for s in model.stages if hasattr(s.downsample, "conv_f")]
    if not pools:
        raise ValueError("the model has no clustering pooling layer")
    idx = stage - 1 if stage > 0 else stage
    if not -len(pools) <= idx < len(pools):
        raise ValueError(f"stage {stage}: the pooling layers are in stages 1..{len(pools)}")
    layer, seen = pools[idx], []
    # the layer's own input: the previous stage's raw output (forward_intermediates gives it
    # through the per-stage GroupNorm when the model is dense)
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    try:
        model.check_input(x)
        model(x)
    finally:
        handle.remove()
    keys = layer.conv_f(seen[0])
    return F.adaptive_avg_pool2d(keys, (keys.shape[-2] // 2, keys.shape[-1] // 2))


@torch.no_grad()
def paper_regions(model: FEC, x: torch.Tensor, k: int, seed: int = 0,
                  labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The paper's figures (official ``cluster_visualize.py``): every pixel's final
    (last pooling layer) cluster, and these clusters merged into ``k`` regions by k-means
    on their key centers as they are, not unit vectors (:func:`pool_key_centers`), non-empty clusters
    only, one k-means start with ``random_state=seed`` (in float64; the official script
    passes float32). ``x`` ``[B, 3, H, W]`` ->
    LongTensor ``[B, H, W]`` (values ``0..k-1``, numbered by decreasing area).
    ``labels``: the last pooling layer's :attr:`LayerMap.labels` ``[B, H, W]`` when ``x``
    was already traced (:func:`trace_clusters`; the command line does), which saves a
    forward pass; by default they are traced here."""
    if labels is None:
        _, maps, _ = trace_clusters(model, x)
        labels = [m for m in maps if m.kind == "pool"][-1].labels
    centers = pool_key_centers(model, x)
    return merge_regions(centers, labels, k, seed=seed, unit=False, n_init=1, nonempty=True)
