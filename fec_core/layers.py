"""FEC's layers: stem, clustering encode (token mixer), clustering pooling, MLP, block.

The arithmetic lives in :mod:`fec_core.clustering`; these modules hold the
parameters and the channel/head/region layout; each clustering layer keeps its last
assignment map while recording (:mod:`fec_core.records`, :meth:`fec_core.FEC.forward_with_clusters`).
Parameter names follow the official implementation so released checkpoints map
one-to-one (``f``, ``v``, ``proj``, ``sim_alpha``, ``sim_beta``, ``conv_f``, ...).

Shapes use the letters of :mod:`fec_core.clustering` (the official code's): a map is
``[B, C, W, H]`` with ``W`` its rows and ``H`` its columns (the book's notation page).
"""
from typing import Optional, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, GroupNorm1, trunc_normal_

from . import clustering as cl
from .records import AssignmentRecorder

__all__ = ["Stem", "ClusterEncode", "ClusterPool", "Mlp", "ClusterBlock", "point_coordinates", "pointwise"]


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A 1x1 convolution as matrix products with the bias fused (chapter 12).

    ``x`` [B, C, W, H], ``weight`` [O, C] (a linear layer's) or [O, C, 1, 1] (a
    convolution's), ``bias`` [O] -> [B, O, W, H] (contiguous): ``F.conv2d(x, weight, bias)``
    up to rounding. Every projection of FEC (keys, values, output, MLP) is one. On a CPU,
    PyTorch runs a multi-threaded 1x1 convolution of a channels-first map through oneDNN,
    which converts the map to its blocked layout and back at every call. Maps of at least
    ``POINTWISE_BMM_MIN`` points are one ``baddbmm`` on the ``[B, C, W * H]`` view (no copy;
    up to 5 times faster at two threads); smaller maps (the last stages, small images),
    where a batch of tiny products is slow, one ``F.linear`` over all ``B * W * H`` points
    (up to 50 times faster for 1x1 maps).
    """
    b, c, rows, cols = x.shape
    weight = weight.reshape(weight.shape[0], c)
    if rows * cols < _bmm_min():
        out = F.linear(x.permute(0, 2, 3, 1).reshape(b * rows * cols, c), weight, bias)
        return out.reshape(b, rows, cols, -1).permute(0, 3, 1, 2).contiguous()
    wt = weight.expand(b, -1, -1)
    x2 = x.reshape(b, c, rows * cols)
    if bias is None:
        return torch.bmm(wt, x2).reshape(b, -1, rows, cols)
    # the bias as [1, O, 1], broadcast by baddbmm: an expanded [B, O, W * H] copy would be cast
    # to full size under autocast (measured: 13% of fec_small's inference memory traffic)
    out = torch.baddbmm(bias.reshape(1, -1, 1), wt, x2)
    return out.reshape(b, -1, rows, cols)


#: Fewest points (W * H) for which :func:`pointwise` uses one batched product per image;
#: measured on 2 cores (chapter 12): ``baddbmm`` wins from 8x8 maps up, ``F.linear`` below.
POINTWISE_BMM_MIN = 64


def _bmm_min() -> int:
    if torch.jit.is_scripting():  # TorchScript reads no module globals: the value of POINTWISE_BMM_MIN
        return 64
    return POINTWISE_BMM_MIN


# FX: pointwise picks its form from the map's size, so a symbolic trace records it as one
# call instead of tracing into it (as for the shape checks below).
torch.fx.wrap("pointwise")


def point_coordinates(x: torch.Tensor) -> torch.Tensor:
    """The two coordinate channels FEC appends to the image (chapter 2).

    ``x`` [B, C, W, H] -> [B, 2, W, H]: row and column position scaled to [0, 1],
    minus 0.5 (so in [-0.5, 0.5]), as in the official code.
    """
    b, _, n_rows, n_cols = x.shape
    rows = torch.arange(n_rows, device=x.device, dtype=torch.float32) / max(n_rows - 1.0, 1.0)
    cols = torch.arange(n_cols, device=x.device, dtype=torch.float32) / max(n_cols - 1.0, 1.0)
    pos = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=0) - 0.5
    return pos.to(x.dtype).unsqueeze(0).expand(b, -1, -1, -1)


class Stem(nn.Module):
    """Images as sets of points (chapter 2): RGB plus coordinates, then a ``patch x patch``
    convolution with stride ``patch`` (the official "point reducer").

    [B, in_chans, W, H] -> [B, dim, W / patch, H / patch].
    """

    def __init__(self, in_chans: int = 3, dim: int = 32, patch: int = 4):
        super().__init__()
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans + 2, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([x, point_coordinates(x)], dim=1))


def _check_fold(name: str, rows: int, cols: int, fold: Tuple[int, int], step: int) -> None:
    """Raise a clear ``ValueError`` when a ``rows x cols`` map cannot be folded into ``fold``
    regions (of an even size when ``step == 2``, as pooling needs)."""
    fw, fh = fold
    if rows % fw != 0 or cols % fh != 0 or (rows // fw) % step != 0 or (cols // fh) % step != 0:
        what = "regions of an even size" if step > 1 else "whole regions"
        hint = " times 2" if step > 1 else ""
        label = name if name != "" else "clustering layer"
        raise ValueError(
            f"{label}: a {rows}x{cols} feature map cannot be split into "
            f"fold {fw}x{fh} {what}; choose an input size whose feature map here is divisible "
            f"by the fold{hint}")


# FX: the shape check becomes one node of a traced graph (kept by dead-code elimination,
# as an assert is), and the coordinates one call, instead of being traced into.
torch.fx.wrap("_check_fold")
if hasattr(torch.fx.node, "has_side_effect"):
    torch.fx.node.has_side_effect(_check_fold)
torch.fx.wrap("point_coordinates")


class ClusterEncode(AssignmentRecorder, nn.Module):
    """Clustering-based feature encoding, the token mixer of a block (Eqs. 4-7, chapters 3-7).

    Per head and per fold region: ``proposal = (gw, gh)`` centers by pooling, gated
    cosine similarity, argmax, aggregation, dispatch; then a 1x1 projection.
    [B, dim, W, H] -> [B, dim, W, H]. With ``record = True`` the last assignment is
    kept in ``last_index``, shape ``[B, heads, fold_w, fold_h, w, h]`` (``w = W / fold_w``
    rows and ``h = H / fold_h`` columns: one fold region).
    """

    kind = "encode"

    def __init__(self, dim: int, heads: int = 4, head_dim: int = 24, proposal: Tuple[int, int] = (2, 2),
                 fold: Tuple[int, int] = (1, 1), literal: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.proposal, self.fold = tuple(proposal), tuple(fold)
        self.literal = literal
        self.f = nn.Conv2d(dim, heads * head_dim, kernel_size=1)  # keys (similarity)
        self.v = nn.Conv2d(dim, heads * head_dim, kernel_size=1)  # values
        self.proj = nn.Conv2d(heads * head_dim, dim, kernel_size=1)
        self.sim_alpha = nn.Parameter(torch.ones(1))
        self.sim_beta = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, rows, cols = x.shape
        _check_fold(self.name, rows, cols, self.fold, 1)
        e, fold_w, fold_h = self.heads, self.fold[0], self.fold[1]
        keys = pointwise(x, self.f.weight, self.f.bias).reshape(b * e, self.head_dim, rows, cols)
        values = pointwise(x, self.v.weight, self.v.bias).reshape(b * e, self.head_dim, rows, cols)
        keys, values = cl.fold(keys, fold_w, fold_h), cl.fold(values, fold_w, fold_h)
        out, index = cl.cluster_encode(keys, values, self.sim_alpha, self.sim_beta, self.proposal, self.literal)
        w, h = rows // fold_w, cols // fold_h  # one region's rows and columns
        if not torch.jit.is_scripting():
            self.keep_assignment(index, [b, e, fold_w, fold_h, w, h])
        out = cl.unfold(out.transpose(1, 2).reshape(b * e * fold_w * fold_h, self.head_dim, w, h), fold_w, fold_h)
        return pointwise(out.reshape(b, e * self.head_dim, rows, cols), self.proj.weight, self.proj.bias)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, proposal={self.proposal}, fold={self.fold}"


class ClusterPool(AssignmentRecorder, nn.Module):
    """Clustering-based feature pooling between stages (Eqs. 4-6 and 9, chapter 8).

    N points -> N/4 representatives (2x2 center grid per region), plus a 3x3
    stride-2 convolution as skip connection, GroupNorm on the representatives.
    [B, in_dim, W, H] -> [B, out_dim, W/2, H/2]. ``conv_f`` only feeds the argmax and
    therefore never receives a gradient. ``last_index``: ``[B, fold_w, fold_h, w, h]``
    (``w x h``: one fold region's rows and columns). Algorithm S1 of the supplement prints the
    output as ``R + res_conn``, without a normalization; this layer follows the official code
    (``models/fec.py``, ``identity + self.norm2(out)``), which applies the GroupNorm.
    """

    kind = "pool"

    def __init__(self, in_dim: int, out_dim: int, fold: Tuple[int, int] = (1, 1), literal: bool = False):
        super().__init__()
        self.fold = tuple(fold)
        self.literal = literal
        self.conv_f = nn.Conv2d(in_dim, out_dim, kernel_size=1)  # keys (similarity only)
        self.conv_v = nn.Conv2d(in_dim, out_dim, kernel_size=1)  # values
        self.conv_skip = nn.Conv2d(in_dim, out_dim, kernel_size=3, padding=1, stride=2)
        self.norm2 = GroupNorm1(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, rows, cols = x.shape
        _check_fold(self.name, rows, cols, self.fold, 2)
        fold_w, fold_h = self.fold[0], self.fold[1]
        identity = self.conv_skip(x)
        keys = cl.fold(pointwise(x, self.conv_f.weight, self.conv_f.bias), fold_w, fold_h)
        values = cl.fold(pointwise(x, self.conv_v.weight, self.conv_v.bias), fold_w, fold_h)
        reps, index = cl.cluster_pool(keys, values, self.literal)
        if not torch.jit.is_scripting():
            self.keep_assignment(index, [b, fold_w, fold_h, rows // fold_w, cols // fold_h])
        return identity + self.norm2(cl.unfold(reps, fold_w, fold_h))

    def extra_repr(self) -> str:
        return f"fold={self.fold}"


class Mlp(nn.Module):
    """Point-wise MLP (two linear layers with GELU), [B, C, W, H] -> [B, C, W, H]."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fc1 / fc2 are nn.Linear (the checkpoints' keys and shapes), applied as 1x1
        # convolutions to the channels-first map: no permuted copies (chapter 12)
        x = self.drop(self.act(pointwise(x, self.fc1.weight, self.fc1.bias)))
        return self.drop(pointwise(x, self.fc2.weight, self.fc2.bias))


class ClusterBlock(nn.Module):
    """One FEC block: ``x + s1 * encode(norm1(x))`` then ``x + s2 * mlp(norm2(x))``,
    with GroupNorm, LayerScale (``layer_scale_1/2``) and DropPath. [B, C, W, H] -> same."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, heads: int = 4, head_dim: int = 24,
                 proposal: Tuple[int, int] = (2, 2), fold: Tuple[int, int] = (1, 1), drop: float = 0.0,
                 drop_path: float = 0.0, layer_scale_init_value: float = 1e-5, literal: bool = False):
        super().__init__()
        self.norm1 = GroupNorm1(dim)
        self.token_mixer = ClusterEncode(dim, heads, head_dim, proposal, fold, literal)
        self.norm2 = GroupNorm1(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.layer_scale_1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.token_mixer(self.norm1(x)))
        return x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x)))


def init_weights(m: nn.Module) -> None:
    """The official initialization: truncated normal (std 0.02) for linear layers, zero bias."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
