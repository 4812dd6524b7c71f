"""Loading official FEC checkpoints (and our own) with clear errors.

A released checkpoint is a file holding ``state_dict``, ``state_dict_ema``, ``model``
or a bare state dict, with the official key names (``patch_embed.*``,
``network.*``), possibly prefixed by ``module.`` (DDP) or ``backbone.``
(mmsegmentation / mmdetection). :func:`load_checkpoint` maps the keys with
:func:`fec_core.model.checkpoint_filter_fn` and refuses anything that does not fit,
naming the missing keys, unexpected keys and shape mismatches.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, Mapping, Optional, Union

import torch

from .model import FEC, checkpoint_filter_fn

__all__ = ["CheckpointError", "read_state_dict", "load_checkpoint", "check_state_dict", "raise_if_mismatch"]

_HEAD = ("head.weight", "head.bias")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


def read_state_dict(source: Union[str, os.PathLike, Mapping], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Read a checkpoint file (or dict) and return its state dict, prefixes stripped, keys mapped.

    Picks ``state_dict_ema`` when ``use_ema`` (and present), else ``model``, ``state_dict``,
    ``state_dict_ema``, else the dict itself.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # truncated, not a torch file, ...
            raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt or not a PyTorch file ({e})") from e
    else:
        obj, path = source, "<dict>"
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    order = ("state_dict_ema", "model", "state_dict") if use_ema else ("model", "state_dict", "state_dict_ema")
    for key in order:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"checkpoint {path} holds no tensors (keys: {list(obj)[:8]})")
    return checkpoint_filter_fn(tensors)


def _short(keys, n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def raise_if_mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], header: str,
                      allowed_missing=frozenset()) -> None:
    """Raise :class:`CheckpointError` naming the missing keys, unexpected keys and shape
    mismatches between a model's state dict ``own`` and ``state`` (``header`` first)."""
    missing = set(own) - set(state) - set(allowed_missing)
    unexpected = set(state) - set(own)
    shapes = {k: (tuple(state[k].shape), tuple(own[k].shape)) for k in set(state) & set(own)
              if state[k].shape != own[k].shape}
    if not (missing or unexpected or shapes):
        return
    msg = [header]
    if missing:
        msg.append(f"missing keys: {_short(missing)}")
    if unexpected:
        msg.append(f"unexpected keys: {_short(unexpected)}")
    if shapes:
        msg.append("shape mismatches: " + "; ".join(f"{k}: checkpoint {a} vs model {b}"
                                                    for k, (a, b) in sorted(shapes.items())[:8]))
    raise CheckpointError("\n  ".join(msg))


def check_state_dict(model: FEC, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Compare a mapped state dict with ``model``; return what to load, or raise.

    Allowed on purpose: a classifier head whose shape differs from the model's (new
    number of classes: the model keeps its fresh head), a head or final norm that a
    head-less model does not have, and the per-stage output norms of a dense model
    loaded from a classification checkpoint (they keep their fresh initialisation:
    GroupNorms with weight 1 and bias 0, which normalize each stage's output but do
    not rescale it; the downstream training learns them). Anything else
    missing, unexpected or of another shape raises :class:`CheckpointError`.
    """
    own = model.state_dict()
    sd = dict(state_dict)
    notes, allowed_missing = [], set()
    if "head.weight" in sd:
        if "head.weight" not in own:
            notes.append("dropped the checkpoint's classifier head (the model has none)")
            [sd.pop(k, None) for k in _HEAD]
        elif sd["head.weight"].shape != own["head.weight"].shape:
            notes.append(f"classifier head not loaded: checkpoint has {sd['head.weight'].shape[0]} classes, "
                         f"model has {own['head.weight'].shape[0]}; the model keeps its new head")
            [sd.pop(k, None) for k in _HEAD]
            allowed_missing |= set(_HEAD)
    if "norm.weight" in sd and "norm.weight" not in own:
        sd.pop("norm.weight"), sd.pop("norm.bias", None)
    out_norms = {k for k in own if k.startswith("out_norms.")}
    if out_norms and not any(k.startswith("out_norms.") for k in sd):
        notes.append("per-stage output norms not in the checkpoint (a classification checkpoint): "
                     "freshly initialised GroupNorms (weight 1, bias 0)")
        allowed_missing |= out_norms
    raise_if_mismatch(own, sd, "checkpoint does not fit this model (is it another FEC variant or setting?)",
                      allowed_missing)
    for note in notes:
        warnings.warn(note, stacklevel=3)
    return sd


def load_checkpoint(model: FEC, source: Union[str, os.PathLike, Mapping], use_ema: bool = False) -> FEC:
    """Load an official (or fec_core) checkpoint into ``model``; see :func:`check_state_dict`.

    ``source``: a path or an already loaded dict. Returns the model.
    """
    sd = check_state_dict(model, read_state_dict(source, use_ema=use_ema))
    model.load_state_dict(sd, strict=False)
    return model
