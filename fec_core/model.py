"""The FEC backbone (book chapter 9), in the style of timm's model files.

``FEC`` has a stem, four stages (stage ``i > 0`` starts with a clustering pooling
layer) of :class:`~fec_core.layers.ClusterBlock`, and either a classifier
(GroupNorm, global average, linear) or, for dense prediction (``dense=True``, the
official ``fork_feat``), one GroupNorm per stage output.

After ``import fec_core`` the variants are timm models::

    timm.create_model('fec_small', num_classes=10, drop_path_rate=0.1)
    timm.create_model('fec_small', features_only=True, out_indices=(0, 1, 2, 3))
    timm.create_model('fec_small_seg', features_only=True)  # or setting='seg'; 'fec_small_det'

As every timm model, ``forward`` returns one tensor (logits, or pooled features
without a classifier); the four stage outputs come from ``features_only=True`` or
:meth:`FEC.forward_intermediates`. The models script (``torch.jit.script``), trace
(``torch.fx``, torchvision's feature extraction), compile (``torch.compile(...,
fullgraph=True)``) and export (``torch.export``, ONNX): input checks run in eager
mode and step aside under tracing.

Official checkpoints (keys ``patch_embed.*``, ``network.*``) are mapped by
:func:`checkpoint_filter_fn`; :func:`fec_core.load_checkpoint` loads a file.
"""
import numbers
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import GroupNorm1
from timm.models import build_model_with_cfg, checkpoint_seq, clean_state_dict, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .layers import ClusterBlock, ClusterEncode, ClusterPool, Stem, init_weights
from .records import collect_records, official_name, recording, stage_and_block

__all__ = ["FEC", "VARIANTS", "SETTINGS", "checkpoint_filter_fn", "input_multiple"]

#: Architecture of the three released variants (official ``models/fec.py``).
VARIANTS: Dict[str, dict] = {
    "fec_small": dict(layers=(3, 4, 5, 2), embed_dims=(32, 64, 196, 320), mlp_ratios=(8, 8, 4, 4),
                      heads=(4, 4, 8, 8), head_dim=(24, 24, 24, 24)),
    "fec_base": dict(layers=(2, 2, 6, 2), embed_dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4),
                     heads=(4, 4, 8, 8), head_dim=(32, 32, 32, 32)),
    "fec_large": dict(layers=(4, 4, 12, 4), embed_dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4),
                      heads=(6, 6, 12, 12), head_dim=(32, 32, 32, 32)),
    # Not in the paper: a small variant for CPU experiments in the book (0.70M parameters with a 1000-class head).
    "fec_tiny": dict(layers=(1, 1, 2, 1), embed_dims=(24, 48, 96, 128), mlp_ratios=(4, 4, 4, 4),
                     heads=(2, 2, 4, 4), head_dim=(12, 12, 16, 16)),
}

#: Center grids and fold regions per stage: ImageNet classification (224x224), the
#: official ADE20K segmentation setting (512x512) and COCO detection setting (1333x800).
#: The per-stage output norms of dense prediction come with ``features_only=True``
#: (or ``dense=True``); a setting alone only chooses the grids and regions.
SETTINGS: Dict[str, dict] = {
    "cls": dict(proposal=(4, 4, 2, 2), fold=(1, 1, 1, 1)),
    "seg": dict(proposal=(10, 10, 5, 5), fold=(1, 1, 1, 1)),
    "det": dict(proposal=(7, 7, 7, 7), fold=(2, 2, 1, 1)),
}

PairOrInt = Union[int, Tuple[int, int]]


def _pair(v: PairOrInt, arg: str = "value") -> Tuple[int, int]:
    """``v`` or ``(w, h)`` -> ``(w, h)`` of positive ints, else a ``ValueError`` naming ``arg``."""
    pair = (v, v) if isinstance(v, numbers.Integral) else tuple(v) if isinstance(v, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(p, numbers.Integral) and p >= 1 for p in pair):
        raise ValueError(f"{arg} must be a positive int or a pair (w, h) of positive ints, got {v!r}")
    return int(pair[0]), int(pair[1])


def _is_tracing() -> bool:
    """True inside a torch.fx symbolic trace (where input checks cannot look at shapes)."""
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing()


def _check_head_args(num_classes, global_pool) -> None:
    """``ValueError`` for a classifier size or pooling that cannot work (constructor and
    :meth:`FEC.reset_classifier`)."""
    if not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0 (0: no classifier), got {num_classes!r}")
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")


def _check_args(layers, embed_dims, heads, head_dim, mlp_ratios, num_classes, in_chans, drop_rate,
                drop_path_rate, global_pool) -> None:
    """``ValueError`` naming the argument for a constructor value that cannot work."""
    if len(layers) < 1:
        raise ValueError("layers must list at least one stage")
    for arg, val in dict(layers=layers, embed_dims=embed_dims, heads=heads, head_dim=head_dim).items():
        if not all(isinstance(v, numbers.Integral) and v >= 1 for v in val):
            raise ValueError(f"{arg} must hold positive ints, got {tuple(val)}")
    if not all(isinstance(r, numbers.Real) and r > 0 for r in mlp_ratios):
        raise ValueError(f"mlp_ratios must be positive, got {tuple(mlp_ratios)}")
    _check_head_args(num_classes, global_pool)
    if not isinstance(in_chans, numbers.Integral) or isinstance(in_chans, bool) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
    for arg, val in dict(drop_rate=drop_rate, drop_path_rate=drop_path_rate).items():
        if not isinstance(val, numbers.Real) or not 0.0 <= val < 1.0:
            raise ValueError(f"{arg} must be in [0, 1), got {val!r}")


class FECStage(nn.Module):
    """One stage: an optional clustering pooling layer, then ``depth`` blocks."""

    def __init__(self, downsample: Optional[nn.Module], blocks: List[nn.Module]):
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class FEC(nn.Module):
    """Feature extraction with clustering (Chen et al., CVPR 2024), book chapter 9.

    Args:
        layers: blocks per stage. embed_dims: channels per stage. mlp_ratios: MLP expansion.
        heads, head_dim: clustering heads per stage and channels per head.
        proposal: center grid ``(w, h)`` (or an int) of the encode layers, per stage.
        fold: region folding ``(w, h)`` (or an int) per stage; stage ``i``'s pooling uses ``fold[i]``.
        num_classes: classifier size (0: no classifier). dense: per-stage GroupNorms for
            dense prediction and no classifier (the official ``fork_feat``); the last one
            normalizes :meth:`forward_features`.
        literal: use the literal clustering path, with dense masks and products (for teaching
            and testing).
        drop_rate: dropout in every block's MLP, as the official ``drop_rate``, and before the
            classifier (``head_drop``, as timm's models have it). The official head has no
            dropout: with ``drop_rate > 0`` the two differ there (the official training
            script's ``--drop`` is 0).
    Input ``[B, in_chans, H, W]``; ``forward`` returns logits ``[B, num_classes]`` (pooled
    features ``[B, C4]`` without a classifier); :meth:`forward_intermediates` the four stage
    outputs (strides 4, 8, 16, 32), normalized per stage when ``dense``.
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 5, 2), embed_dims: Sequence[int] = (32, 64, 196, 320),
                 mlp_ratios: Sequence[float] = (8, 8, 4, 4), heads: Sequence[int] = (4, 4, 8, 8),
                 head_dim: Sequence[int] = (24, 24, 24, 24), proposal: Sequence[PairOrInt] = (4, 4, 2, 2),
                 fold: Sequence[PairOrInt] = (1, 1, 1, 1), num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, layer_scale_init_value: float = 1e-5,
                 dense: bool = False, literal: bool = False, global_pool: str = "avg"):
        super().__init__()
        n = len(layers)
        for arg, val in dict(embed_dims=embed_dims, mlp_ratios=mlp_ratios, heads=heads, head_dim=head_dim,
                             proposal=proposal, fold=fold).items():
            if len(val) != n:
                raise ValueError(f"{arg} has {len(val)} entries, layers has {n}")
        _check_args(layers=layers, embed_dims=embed_dims, heads=heads, head_dim=head_dim, mlp_ratios=mlp_ratios,
                    num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                    drop_path_rate=drop_path_rate, global_pool=global_pool)
        self.num_classes = 0 if dense else num_classes
        self.in_chans = in_chans
        self.dense = dense
        self.embed_dims = tuple(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.drop_rate = drop_rate
        self.global_pool = global_pool
        self.grad_checkpointing = False
        proposal = [_pair(p, f"proposal[{i}]") for i, p in enumerate(proposal)]
        fold = [_pair(f, f"fold[{i}]") for i, f in enumerate(fold)]

        self.stem = Stem(in_chans, embed_dims[0], patch=4)
        total = sum(layers)
        # the official per-block drop-path rates, in double precision (not timm.layers.
        # calculate_drop_path_rates: it rounds them to float32, and timm < 1.0.22 lacks it)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, self.feature_info, k = [], [], 0
        for i in range(n):
            down = ClusterPool(embed_dims[i - 1], embed_dims[i], fold[i], literal) if i > 0 else None
            blocks = [ClusterBlock(embed_dims[i], mlp_ratios[i], heads[i], head_dim[i], proposal[i], fold[i],
                                   drop_rate, dpr[k + j], layer_scale_init_value, literal) for j in range(layers[i])]
            k += layers[i]
            stages.append(FECStage(down, blocks))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)

        if dense:
            self.out_norms = nn.ModuleList([GroupNorm1(d) for d in embed_dims])
            self.norm = nn.Identity()
        else:
            self.norm = GroupNorm1(embed_dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.apply(init_weights)
        for name, m in self.named_modules():
            if isinstance(m, (ClusterEncode, ClusterPool)):
                m.name, m.official_name = name, official_name(name)
                m.stage = stage_and_block(name)[0]

    # ------------------------------------------------------------------ timm API
    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else
                    [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                     (r"^norm|^out_norms", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """Replace the classifier with a fresh one for ``num_classes`` classes (0 removes it)."""
        _check_head_args(num_classes, self.global_pool if global_pool is None else global_pool)
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            init_weights(self.head)

    def clustering_layers(self) -> List[nn.Module]:
        """Every clustering layer (encode and pool) in forward order."""
        return [m for m in self.modules() if isinstance(m, (ClusterEncode, ClusterPool))]

    def set_literal(self, literal: bool = True) -> "FEC":
        """Switch every clustering layer between the literal path (dense masks and products)
        and the fast path."""
        for m in self.clustering_layers():
            m.literal = literal
        return self

    # ------------------------------------------------------------------ forward
    @torch.jit.unused
    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear ``ValueError`` (shape) or ``TypeError`` (dtype) for an input FEC
        cannot process. Skipped under TorchScript and torch.fx tracing."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"FEC expects an image batch [B, {self.in_chans}, H, W], got {shape}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"FEC was built for {self.in_chans} input channels, got {x.shape[1]} "
                             f"(input shape {tuple(x.shape)})")
        if x.shape[0] == 0:
            raise ValueError(f"FEC got an empty batch (input shape {tuple(x.shape)})")
        h, w = x.shape[-2:]
        if h < 4 or w < 4:
            raise ValueError(f"input {h}x{w} is smaller than the 4x4 stem")
        if not x.is_floating_point():
            raise TypeError(f"FEC expects a floating-point image batch, got {x.dtype}; convert it first, "
                            f"e.g. x.float() / 255, then normalize with the model's mean and std")
        weight = self.stem.proj.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"input is {x.dtype} but the model's weights are {weight.dtype}; "
                            f"convert one of them (x.to({weight.dtype}) or model.to({x.dtype}))")

    def _check(self, x: torch.Tensor) -> None:
        if not torch.jit.is_scripting():
            if not _is_tracing():
                self.check_input(x)

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "out_norms"):  # dense: the last stage's output norm (official norm6)
            return self.out_norms[-1](x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_chans, H, W] -> last stage's feature map, normalized, [B, C4, H/32, W/32]."""
        self._check(x)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self._final_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """[B, C4, h, w] -> logits [B, num_classes] (or the pooled features if ``pre_logits``)."""
        if self.global_pool == "avg":
            x = x.mean((-2, -1))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Multi-scale features for dense prediction (strides 4, 8, 16, 32).

        Returns the stage outputs selected by ``indices`` (all by default), each
        ``[B, C_i, H / 2^(i+2), W / 2^(i+2)]``, normalized by the per-stage GroupNorm when
        the model is ``dense`` (the official ``fork_feat`` outputs). With
        ``intermediates_only=False`` returns ``(final features, intermediates)``, the final
        features being :meth:`forward_features`'s.
        """
        if output_fmt != "NCHW":
            raise ValueError("FEC features are NCHW")
        self._check(x)
        take, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        x = self.stem(x)
        feats = []
        for i, stage in enumerate(stages):
            x = self._run_stage(stage, x)
            if i in take:
                feats.append(self.out_norms[i](x) if self.dense else x)
        if intermediates_only:
            return feats
        return self._final_norm(x), feats

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        """Drop the stages (and output norms) after the last wanted feature, and the head,
        for ``features_only``."""
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if self.dense:
            self.out_norms = self.out_norms[:max_index + 1]
        if prune_head:
            self.reset_classifier(0)
            if not self.dense:
                self.norm = nn.Identity()
        return take

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` -> logits ``[B, num_classes]``, or the pooled features
        ``[B, C4]`` without a classifier (``[B, C4, h, w]`` with ``global_pool=''``), as every
        timm model. The four stage outputs of dense prediction: :meth:`forward_intermediates`
        or ``timm.create_model(name, features_only=True)``."""
        return self.forward_head(self.forward_features(x))

    @torch.jit.unused
    def forward_with_clusters(self, x: torch.Tensor, intermediates: bool = False):
        """Forward pass that also returns every clustering layer's assignments
        (:mod:`fec_core.records`: why they are recorded here).

        Returns ``(output, records)``: ``output`` as :meth:`forward` (with
        ``intermediates=True``: the stage outputs of :meth:`forward_intermediates`), ``records`` a list of
        :class:`~fec_core.records.ClusterRecord` in forward order (pooling and encode layers), e.g.
        for ``fec_small`` at 224x224: 14 encode records and 3 pooling records.
        """
        with recording(self.clustering_layers()) as layers:
            out = self.forward_intermediates(x, intermediates_only=True) if intermediates else self(x)
        return out, collect_records(layers)


def input_multiple(model: FEC) -> int:
    """The smallest ``m`` such that every ``H`` divisible by ``m`` passes all of ``model``'s
    layers (stem stride 4, pooling by 2 per stage, fold regions of even size)."""
    folds = [m.fold for m in model.clustering_layers()]
    need = 4 * 2 ** (len(model.stages) - 1)
    for mult in range(need, need * 64 + 1, need):
        ok = True
        for layer in model.clustering_layers():
            size = mult // (4 * 2 ** layer.stage)
            f = max(layer.fold)
            if layer.kind == "pool":
                ok &= (2 * size) % (2 * f) == 0
            else:
                ok &= size % f == 0
        if ok:
            return mult
    raise ValueError(f"no input size fits the folds {folds}")


# ---------------------------------------------------------------------------- timm glue
def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: Optional[FEC] = None):
    """Map an official checkpoint's keys to ours (timm's ``pretrained_filter_fn``).

    Strips the ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) prefixes with timm's
    ``clean_state_dict``, then ``model.`` (timm's ``features_only`` wrapper) and ``backbone.``
    (keep only the backbone of a full MMSeg / MMDet checkpoint first:
    :func:`fec_core.checkpoint.split_backbone`); renames ``patch_embed`` -> ``stem``,
    ``network.{2i}.k`` -> ``stages.i.blocks.k``, ``network.{2i-1}`` -> ``stages.i.downsample``,
    ``norm{2i}`` -> ``out_norms.i``. Keys already in our layout pass through.
    """
    out = {}
    for k, v in clean_state_dict(state_dict).items():
        for prefix in ("model.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        k = re.sub(r"^patch_embed\.", "stem.", k)
        m = re.match(r"^network\.(\d+)\.(.*)$", k)
        if m:
            j, rest = int(m.group(1)), m.group(2)
            k = f"stages.{j // 2}.blocks.{rest}" if j % 2 == 0 else f"stages.{(j + 1) // 2}.downsample.{rest}"
        m = re.match(r"^norm(\d+)\.(.*)$", k)
        if m:
            k = f"out_norms.{int(m.group(1)) // 2}.{m.group(2)}"
        out[k] = v
    return out


def _cfg(**kwargs):
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.9, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.proj", "classifier": "head", "license": "apache-2.0",
        "paper_ids": "arXiv:2403.17409", "paper_name": "Neural Clustering based Visual Representation Learning",
        "origin_url": "https://github.com/guikunchen/FEC", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "fec_small.in1k": _cfg(),
    "fec_base.in1k": _cfg(),
    "fec_large.in1k": _cfg(),
    "fec_tiny.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
    "fec_small_seg.untrained": _cfg(num_classes=0, input_size=(3, 512, 512), pool_size=(16, 16)),
    "fec_base_seg.untrained": _cfg(num_classes=0, input_size=(3, 512, 512), pool_size=(16, 16)),
    "fec_large_seg.untrained": _cfg(num_classes=0, input_size=(3, 512, 512), pool_size=(16, 16)),
    "fec_small_det.untrained": _cfg(num_classes=0, input_size=(3, 800, 1344), pool_size=(25, 42)),
    "fec_base_det.untrained": _cfg(num_classes=0, input_size=(3, 800, 1344), pool_size=(25, 42)),
    "fec_large_det.untrained": _cfg(num_classes=0, input_size=(3, 800, 1344), pool_size=(25, 42)),
})


def _check_out_indices(out_indices, n: int) -> None:
    """``out_indices``: a non-empty sequence of stage indices in ``[-n, n)``, or an int ``k``
    in ``[1, n]`` (the last ``k`` stages, timm's convention)."""
    if isinstance(out_indices, numbers.Integral):
        if not 1 <= out_indices <= n:
            raise ValueError(f"out_indices={out_indices!r}: an int means the last k stages, k in [1, {n}]")
        return
    idx = tuple(out_indices) if isinstance(out_indices, (tuple, list)) else None
    if not idx:
        raise ValueError(f"out_indices must name at least one of the {n} stages (0..{n - 1}), got {out_indices!r}")
    bad = [i for i in idx if not isinstance(i, numbers.Integral) or not -n <= i < n]
    if bad:
        raise ValueError(f"out_indices {idx}: {bad} not stage indices; FEC has {n} stages (0..{n - 1})")


def _create_fec(variant: str, pretrained: bool = False, **kwargs) -> FEC:
    base = variant.split("_")[0] + "_" + variant.split("_")[1]  # fec_small_seg -> fec_small
    setting = kwargs.pop("setting", variant.split("_")[2] if variant.count("_") == 2 else "cls")
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose one of {sorted(SETTINGS)}")
    args = {**VARIANTS[base], **SETTINGS[setting]}
    features_only = kwargs.get("features_only", False)
    if features_only:
        args["dense"] = True
    args.update(kwargs)
    out_indices = args.pop("out_indices", (0, 1, 2, 3))
    if features_only:
        _check_out_indices(out_indices, len(args["layers"]))
    return build_model_with_cfg(
        FEC, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices), **args)


@register_model
def fec_tiny(pretrained: bool = False, **kwargs) -> FEC:
    """FEC-Tiny: not in the paper, a small variant for CPU experiments (layers 1-1-2-1)."""
    return _create_fec("fec_tiny", pretrained, **kwargs)


@register_model
def fec_small(pretrained: bool = False, **kwargs) -> FEC:
    """FEC-Small: 5.5M parameters (5,727,528), 1.4 GMACs at 224x224."""
    return _create_fec("fec_small", pretrained, **kwargs)


@register_model
def fec_base(pretrained: bool = False, **kwargs) -> FEC:
    """FEC-Base: 14.4M parameters (15,086,848), 3.335 GMACs at 224x224 (fec_core.costs);
    the paper rounds the official fvcore count, 3.350 GMACs, to 3.4."""
    return _create_fec("fec_base", pretrained, **kwargs)


@register_model
def fec_large(pretrained: bool = False, **kwargs) -> FEC:
    """FEC-Large: 28.3M parameters (29,720,344), 6.5 GMACs at 224x224."""
    return _create_fec("fec_large", pretrained, **kwargs)


@register_model
def fec_small_seg(pretrained: bool = False, **kwargs) -> FEC:
    """FEC-Small backbone with the official ADE20K setting (centers 10, 10, 5, 5)."""
    return _create_fec("fec_small_seg", pretrained, **kwargs)


@register_model
def fec_base_seg(pretrained: bool = False, **kwargs) -> FEC:
    """FEC-Base backbone with the official ADE20K setting (centers 10, 10, 5, 5)."""
    return _create_fec("fec_base_seg", pretrained, **kwargs)


@register_model
def fec_large_seg(pretrained: bool = False, **kwargs) -> FEC:
    """FEC-Large backbone with the official ADE20K setting (centers 10, 10, 5, 5)."""
    return _create_fec("fec_large_seg", pretrained, **kwargs)


@register_model
def fec_small_det(pretrained: bool = False, **kwargs) -> FEC:
    """FEC-Small backbone with the official COCO setting (7 centers, folds 2, 2, 1, 1)."""
    return _create_fec("fec_small_det", pretrained, **kwargs)


@register_model
def fec_base_det(pretrained: bool = False, **kwargs) -> FEC:
    """FEC-Base backbone with the official COCO setting (7 centers, folds 2, 2, 1, 1)."""
    return _create_fec("fec_base_det", pretrained, **kwargs)


@register_model
def fec_large_det(pretrained: bool = False, **kwargs) -> FEC:
    """FEC-Large backbone with the official COCO setting (7 centers, folds 2, 2, 1, 1)."""
    return _create_fec("fec_large_det", pretrained, **kwargs)
