"""The official code next to ours (chapter 12): :func:`load_official` imports a copy of
the official ``models/fec.py``; the official model is built with our model's weights and
its outputs compared with ours."""
from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import io
import os
import sys
import types
import warnings

import timm.models
import torch
import torch.nn as nn

from ..model import checkpoint_filter_fn
from .settings import BenchConfig

with warnings.catch_warnings():  # the deprecated module the official file imports register_model from
    warnings.simplefilter("ignore")
    import timm.models.registry as deprecated_registry

__all__ = ["load_official", "build_official", "agreement"]


def load_official(path: str):
    """Import the official ``models/fec.py`` from the file ``path`` as a module.

    The file imports ``torch_scatter.scatter_sum``; when ``torch_scatter`` is not
    installed, a stand-in module serves it with ``index_add_`` (the file calls it only
    as ``scatter_sum(src [K, D], index [K], dim=0, dim_size=S)``: the same sums into a
    zero ``[S, D]`` tensor, in ``src``'s dtype, as torch_scatter's ``scatter_add_``).
    Its ``@register_model`` is switched off while it loads, so that timm's
    ``fec_small`` stays ours. What the file prints while loading (mmseg / mmdet
    notices) is discarded.
    """
    if not os.path.isfile(path):
        raise ValueError(f"--official {path}: no such file (a copy of the official models/fec.py)")
    if importlib.util.find_spec("torch_scatter") is None and "torch_scatter" not in sys.modules:
        shim = types.ModuleType("torch_scatter")

        def scatter_sum(src, index, dim=0, dim_size=None):
            if dim != 0 or src.ndim != 2:
                raise NotImplementedError("the stand-in scatter_sum covers dim=0 on [K, D] only")
            size = int(index.max()) + 1 if dim_size is None else dim_size
            return src.new_zeros(size, src.shape[1]).index_add_(0, index, src)
        shim.scatter_sum = scatter_sum
        shim.__fec_core_stand_in__ = True
        sys.modules["torch_scatter"] = shim
    saved = (timm.models.register_model, deprecated_registry.register_model)
    timm.models.register_model = deprecated_registry.register_model = lambda fn: fn
    loader = importlib.machinery.SourceFileLoader("fec_official", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("fec_official", loader))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            loader.exec_module(module)
    except ImportError as err:
        raise ValueError(f"--official {path}: cannot import it ({err}); it needs einops and timm") from err
    except Exception as err:  # noqa: BLE001 - not Python, or not the official file
        raise ValueError(f"--official {path}: not a loadable models/fec.py ({type(err).__name__}: {err})"
                         ) from err
    finally:
        timm.models.register_model, deprecated_registry.register_model = saved
    return module


def build_official(cfg: BenchConfig, model: nn.Module, device: torch.device) -> nn.Module:
    """The official model of the same variant; ``model`` (ours) gets its weights."""
    module = load_official(cfg.official)
    if not hasattr(module, cfg.model):
        raise ValueError(f"--official {cfg.official} defines no {cfg.model!r} "
                         f"(it has fec_small, fec_base, fec_large)")
    torch.manual_seed(cfg.seed)
    kwargs = dict(fork_feat=True) if cfg.dense else dict(num_classes=1000)
    official = getattr(module, cfg.model)(**kwargs)
    model.load_state_dict(checkpoint_filter_fn(official.state_dict()), strict=True)
    return official.to(device)


def agreement(model: nn.Module, official: nn.Module, device: torch.device, resolution: int) -> dict:
    """Largest output difference between ours (fast path) and the official code on two
    random images in float32: a check that both run the same model with the same weights."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, resolution, resolution, generator=gen).to(device)
    model.eval().set_literal(False)
    official.eval()
    with torch.no_grad():
        a = model.forward_intermediates(x, intermediates_only=True) if model.dense else model(x)
        b = official(x)
    a = a if isinstance(a, (list, tuple)) else [a]
    b = b if isinstance(b, (list, tuple)) else [b]
    diff = max(float((u.float() - v.float()).abs().max()) for u, v in zip(a, b))
    scale = max(float(v.float().abs().max()) for v in b)
    return dict(max_abs_diff=diff, output_scale=scale, resolution=resolution)
