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
pooling layer, non-empty clusters, unnormalized, one start).

What the regions are good for, an unsupervised foreground segmentation, its classical
baseline and their evaluation, is :mod:`fec_core.foreground` (its names are importable
from here too: ``interpret.segment_foreground`` and so on).

Shapes: ``B`` batch, ``H x W`` image, ``h x w`` a layer's feature map (rows x
columns, row-major point index ``r * w + c``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .model import FEC, ClusterRecord, stage_and_block

__all__ = ["LayerMap", "stem_points", "pool_parents", "encode_clusters", "trace", "trace_clusters",
           "select_layers", "merge_regions", "pool_key_centers", "paper_regions", "match_labels"]

#: The foreground segmentation of chapter 11, in :mod:`fec_core.foreground`; importable from
#: here as before (loaded on first use: that module builds on this one).
_FOREGROUND = ("border_share", "foreground_from_regions", "segment_foreground", "kmeans_pixels",
               "kmeans_foreground", "patch_oracle", "foreground_iou", "evaluate_segmentation")


def __getattr__(name: str):
    if name in _FOREGROUND:
        from . import foreground

        return getattr(foreground, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_FOREGROUND))


@dataclass
class LayerMap:
    """The clusters of one layer, as a label map at image resolution.

    ``labels``: LongTensor ``[B, H, W]``; two pixels share a label iff they are in the
    same cluster of this layer (labels are unique over the whole image: fold
    regions get disjoint label ranges). ``num_clusters``: how many labels the layer
    can produce (``points`` for the stem and the pools: the size of the layer's
    output map; ``fold regions x centers`` for encode layers). ``head``: the
    encode head (``None`` for the stem and the pools). ``grid``: the layer's output
    map ``(h, w)`` for the stem and the pools, the center grid for encode layers.
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
    h, w = height // patch, width // patch
    if h < 1 or w < 1:
        raise ValueError(f"image {height}x{width} is smaller than one {patch}x{patch} stem patch")
    rows = (torch.arange(height, device=device) // patch).clamp(max=h - 1)
    cols = (torch.arange(width, device=device) // patch).clamp(max=w - 1)
    return rows[:, None] * w + cols[None, :]


def pool_parents(record: ClusterRecord) -> torch.Tensor:
    """Where each point goes in one pooling layer (Eq. 5, chapter 8).

    ``record.index`` ``[B, fold_r, fold_c, rr, rc]`` (``fold_r x fold_c`` regions of
    ``rr x rc`` points; the value is the region-local center index, row-major over the
    region's ``(rr/2) x (rc/2)`` center grid) -> LongTensor ``[B, h * w]``: for every point
    of the input map (``h = fold_r * rr`` rows, ``w = fold_c * rc`` columns, row-major)
    the row-major index of its representative in the ``(h/2) x (w/2)`` output map.
    """
    if record.kind != "pool":
        raise ValueError(f"{record.name} is an {record.kind} layer, not a pooling layer")
    idx = record.index
    b, fr, fc, rr, rc = idx.shape
    gr, gc = rr // 2, rc // 2
    dev = idx.device
    crow = idx // gc + torch.arange(fr, device=dev).view(1, fr, 1, 1, 1) * gr
    ccol = idx % gc + torch.arange(fc, device=dev).view(1, 1, fc, 1, 1) * gc
    parent = crow * (fc * gc) + ccol  # [B, fr, fc, rr, rc]
    return parent.permute(0, 1, 3, 2, 4).reshape(b, fr * rr * fc * rc)


def encode_clusters(record: ClusterRecord) -> torch.Tensor:
    """The clusters of one encode layer (Eq. 5, chapter 5), per head.

    ``record.index`` ``[B, E, fold_r, fold_c, rr, rc]`` -> LongTensor ``[B, E, h * w]``
    (row-major over the layer's whole ``h x w`` map): region ``(i, j)``'s center ``m``
    gets the label ``(i * fold_c + j) * M + m`` with ``M`` centers per region.
    """
    if record.kind != "encode":
        raise ValueError(f"{record.name} is a {record.kind} layer, not an encode layer")
    idx = record.index
    b, e, fr, fc, rr, rc = idx.shape
    region = torch.arange(fr * fc, device=idx.device).view(1, 1, fr, fc, 1, 1)
    labels = idx + region * record.num_centers
    return labels.permute(0, 1, 2, 4, 3, 5).reshape(b, e, fr * rr * fc * rc)


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
            _, fr, fc, rr, rc = r.index.shape
            if (fr * rr, fc * rc) != (hs, ws):
                raise ValueError(f"{r.name}: input map {fr * rr}x{fc * rc} does not follow the previous "
                                 f"layer's {hs}x{ws}; are the records from one forward pass of one input?")
            pos = torch.gather(pool_parents(r), 1, pos)
            hs, ws = hs // 2, ws // 2
            maps.append(LayerMap(r.name, "pool", r.stage, pos.reshape(b, height, width), hs * ws, (hs, ws)))
        elif r.kind == "encode":
            lab = encode_clusters(r)  # [B, E, h*w]
            if lab.shape[-1] != hs * ws:
                raise ValueError(f"{r.name}: map of {lab.shape[-1]} points, expected {hs}x{ws}")
            keep = range(lab.shape[1]) if heads is None else [h for h in heads if h < lab.shape[1]]
            n = r.num_centers * r.index.shape[2] * r.index.shape[3]
            for h in keep:
                pix = torch.gather(lab[:, h], 1, pos).reshape(b, height, width)
                maps.append(LayerMap(r.name, "encode", r.stage, pix, n, tuple(r.grid), head=h))
        else:
            raise ValueError(f"unknown record kind {r.kind!r}")
    return maps


@torch.no_grad()
def trace_clusters(model: FEC, x: torch.Tensor, heads: Optional[Sequence[int]] = None
                   ) -> Tuple[torch.Tensor, List[LayerMap], List[torch.Tensor]]:
    """One forward pass of ``model`` on ``x`` ``[B, 3, H, W]`` with every cluster traced to the pixels.

    Returns ``(output, maps, stage_features)``: the model's output, the
    :class:`LayerMap` list of :func:`trace` and every stage's output features
    ``[B, C_s, h_s, w_s]`` (the representatives, as updated by the stage's blocks:
    :meth:`FEC.forward_intermediates`, per-stage normalized when the model is ``dense``;
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


def select_layers(maps: Sequence[LayerMap], which: str = "all", head: Optional[int] = 0) -> List[LayerMap]:
    """Pick the maps to draw: ``which`` is ``'all'`` (stem, pools and encode layers),
    ``'pool'`` (stem and pools: the hierarchy), ``'encode'``, or a comma-separated list of
    layer names or 0-based positions in the list of distinct layers. Encode layers keep
    only ``head`` (``None``: every head)."""
    names = []
    for m in maps:
        if m.name not in names:
            names.append(m.name)
    if which == "all":
        keep = names
    elif which == "pool":
        keep = [n for n, m in zip(names, _first_of(maps, names)) if m.kind in ("stem", "pool")]
    elif which == "encode":
        keep = [n for n, m in zip(names, _first_of(maps, names)) if m.kind == "encode"]
    else:
        keep = []
        for part in [p.strip() for p in which.split(",") if p.strip()]:
            if part.lstrip("-").isdigit():
                i = int(part)
                if not -len(names) <= i < len(names):
                    raise ValueError(f"layer {i} does not exist; the model has {len(names)} layers "
                                     f"(0..{len(names) - 1})")
                keep.append(names[i])
            elif part in names:
                keep.append(part)
            else:
                raise ValueError(f"unknown layer {part!r}; use 'all', 'pool', 'encode', positions or names such as "
                                 f"{', '.join(names[:4])}")
    return [m for m in maps if m.name in keep and (m.head is None or head is None or m.head == head)]


def _first_of(maps: Sequence[LayerMap], names: Sequence[str]) -> List[LayerMap]:
    return [next(m for m in maps if m.name == n) for n in names]


# ---------------------------------------------------------------------------- merging
def _kmeans(points: np.ndarray, k: int, seed: int, n_init: int) -> np.ndarray:
    """scikit-learn's k-means (:cite:`lloyd1982kmeans`) on ``points`` ``[N, D]`` -> labels ``[N]``.

    Call it inside :func:`_one_thread`: for the small problems here (one image at a time)
    thread start-up costs far more than it saves, especially on a busy machine.
    """
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning when fewer distinct points than k
        return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(points.astype(np.float64)).labels_


def _one_thread():
    """A context in which scikit-learn's k-means (and any BLAS / OpenMP pool) runs on one
    thread. Entered once per batch of images, not per image: entering it inspects every loaded
    library, about 4 ms, as long as a small k-means itself (measured, chapter 11's images)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def merge_regions(features: torch.Tensor, labels: torch.Tensor, k: int, seed: int = 0,
                  normalize: bool = True, n_init: int = 10, nonempty: bool = False) -> torch.Tensor:
    """Merge representatives into ``k`` regions with k-means (scikit-learn).

    ``features`` ``[B, C, h, w]``: one vector per representative (e.g. the last stage's
    output, or :func:`pool_key_centers`); ``labels`` ``[B, H, W]``: every pixel's
    representative (row-major index into ``h x w``, the last pooling layer's
    :attr:`LayerMap.labels`). Per image, k-means with ``k`` clusters runs on the feature
    vectors (L2-normalized when ``normalize``: FEC compares points by cosine; ``n_init``
    starts, the best kept) and each pixel takes its representative's region. With
    ``nonempty`` only the representatives that some pixel joined take part, and when
    there are at most ``k`` of them each is its own region (no k-means).
    Returns LongTensor ``[B, H, W]`` with values in ``0..k-1``. Regions are numbered by
    decreasing area, so the labels do not depend on k-means' arbitrary order.

    The official ``cluster_visualize.py`` (the paper's figures) is :func:`paper_regions`:
    this function on the last pooling layer's *key centers*, ``normalize=False``,
    ``n_init=1``, ``nonempty=True``. The defaults here (the last stage's
    representatives, normalized, 10 starts, all representatives) are this library's
    variant; chapter 11 compares the two.
    """
    b, c, h, w = features.shape
    if labels.shape[0] != b:
        raise ValueError(f"features for {b} images, labels for {labels.shape[0]}")
    if int(labels.max()) >= h * w or int(labels.min()) < 0:
        raise ValueError(f"labels must index the {h}x{w} representatives; got values up to {int(labels.max())}")
    if not 1 <= k <= h * w:
        raise ValueError(f"k={k} regions from {h * w} representatives: choose 1 <= k <= {h * w}")
    feats = features.detach().float().flatten(2).transpose(1, 2).cpu()  # [B, hw, C]
    if normalize:
        feats = F.normalize(feats, dim=-1)
    out = torch.empty_like(labels)
    with _one_thread():
        for i in range(b):
            used = torch.unique(labels[i]).cpu() if nonempty else torch.arange(h * w)
            if nonempty and len(used) <= k:
                part = torch.arange(len(used))
            else:
                part = torch.from_numpy(_kmeans(feats[i][used].numpy(), k, seed, n_init)).long()
            region = torch.zeros(h * w, dtype=torch.long)
            region[used] = part
            out[i] = _by_area(region.to(labels.device)[labels[i]], k)
    return out


@torch.no_grad()
def pool_key_centers(model: FEC, x: torch.Tensor, stage: int = -1) -> torch.Tensor:
    """The key centers of a pooling layer (Eq. 4, chapters 3 and 8): the layer's keys
    ``conv_f(input)`` average-pooled over its ``2x2`` center grid, ``[B, C, h, w]`` with
    ``h x w`` the layer's output map. ``stage``: the stage whose pooling layer (1..3, or
    -1 for the last). One forward pass of ``model`` on ``x`` ``[B, 3, H, W]``."""
    pools = [s.downsample for s in model.stages if hasattr(s.downsample, "conv_f")]
    if not pools:
        raise ValueError("the model has no clustering pooling layer")
    idx = stage - 1 if stage > 0 else stage
    if not -len(pools) <= idx < len(pools):
        raise ValueError(f"stage {stage}: the pooling layers are in stages 1..{len(pools)}")
    layer, seen = pools[idx], []
    # the layer's own input: the previous stage's raw output (forward_intermediates gives it
    # normalized when the model is dense)
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
    on their unnormalized key centers (:func:`pool_key_centers`), non-empty clusters
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
    return merge_regions(centers, labels, k, seed=seed, normalize=False, n_init=1, nonempty=True)


def _by_area(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Renumber ``labels`` (values ``0..k-1``) by decreasing pixel count (ties: smaller label first)."""
    counts = torch.bincount(labels.reshape(-1), minlength=k)
    order = sorted(range(k), key=lambda j: (-int(counts[j]), j))
    remap = torch.empty(k, dtype=torch.long, device=labels.device)
    remap[torch.tensor(order, device=labels.device)] = torch.arange(k, device=labels.device)
    return remap[labels]


def match_labels(labels: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Renumber ``labels`` ``[H, W]`` so that its regions best overlap ``reference``'s
    (Hungarian matching of the overlap counts, scipy). Used to keep colors consistent
    across panels; regions without a partner get new numbers after ``reference``'s."""
    from scipy.optimize import linear_sum_assignment

    a, ua = np.unique(labels, return_inverse=True)
    r, ur = np.unique(reference, return_inverse=True)
    overlap = np.zeros((len(a), len(r)), dtype=np.int64)
    np.add.at(overlap, (ua.reshape(-1), ur.reshape(-1)), 1)
    rows, cols = linear_sum_assignment(-overlap)
    new = np.empty(len(a), dtype=np.int64)
    new[rows] = r[cols]
    rest = np.setdiff1d(np.arange(len(a)), rows)
    new[rest] = int(reference.max()) + 1 + np.arange(len(rest))
    return new[ua].reshape(labels.shape)
