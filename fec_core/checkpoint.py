"""Loading official FEC checkpoints (and our own) with clear errors.

A released checkpoint is a file holding ``state_dict``, ``state_dict_ema``, ``model``
or a bare state dict, with the official key names (``patch_embed.*``,
``network.*``), possibly prefixed by ``module.`` (DDP). A full MMSegmentation or
MMDetection checkpoint (``backbone.*`` next to ``neck.*``, ``decode_head.*``,
``roi_head.*``, ...) gives its backbone: :func:`split_backbone` keeps the
``backbone.*`` tensors and names the prefixes it skipped. :func:`load_checkpoint`
maps the keys with :func:`fec_core.model.checkpoint_filter_fn` and refuses anything
that does not fit, naming the missing keys, unexpected keys and shape mismatches.
It loads into an :class:`~fec_core.FEC` or into timm's ``features_only`` wrapper of one.

Files are read without running code (:func:`read_file`): ``.safetensors`` files (timm's and the
Hub's format) hold tensors only; PyTorch files are unpickled with ``weights_only=True``, which
builds tensors, numbers, strings and containers of them and nothing else, plus
``argparse.Namespace`` (the ``args`` that timm's and the official ``train.py``'s
``CheckpointSaver`` store) and numpy scalars (MMSegmentation 0.x's ``meta``). A file that needs
any other class or function is refused with one line naming it; ``trust=True`` (or
:func:`trusted`) loads it with full unpickling, which runs whatever code the file carries. Not
``timm.models.load_state_dict``: before timm 1.0.26 it unpickles in full by default, and in
every version a refused or broken file raises torch's own paragraph (or a bare
``FileNotFoundError``), a safetensors file is told by its name only, and the EMA weights are
taken when present; the prefixes are stripped with timm's ``clean_state_dict``
(:func:`fec_core.model.checkpoint_filter_fn`).
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import os
import re
import warnings
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file  # a dependency of timm
from torch.torch_version import TorchVersion

try:  # numpy 2
    from numpy._core import multiarray as np_multiarray
except ImportError:  # numpy 1
    from numpy.core import multiarray as np_multiarray

from .model import FEC, checkpoint_filter_fn

__all__ = ["CheckpointError", "read_file", "trusted", "SAFE_GLOBALS", "read_state_dict", "split_backbone",
           "load_checkpoint", "check_state_dict", "raise_if_mismatch"]

_HEAD = ("head.weight", "head.bias")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


def split_backbone(state_dict: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The backbone of a full downstream checkpoint: ``(backbone state dict, skipped prefixes)``.

    When some keys start with ``backbone.`` (after an optional DDP ``module.``), as in
    MMSegmentation / MMDetection checkpoints, keeps those (prefix still on) and returns the
    sorted first components of the others (e.g. ``['auxiliary_head', 'decode_head']``).
    A checkpoint without ``backbone.`` keys is returned whole, with nothing skipped.
    """
    def strip(k: str) -> str:
        return k[len("module."):] if k.startswith("module.") else k

    if not any(strip(k).startswith("backbone.") for k in state_dict):
        return dict(state_dict), []
    kept = {k: v for k, v in state_dict.items() if strip(k).startswith("backbone.")}
    skipped = sorted({strip(k).split(".")[0] for k in state_dict if k not in kept})
    return kept, skipped


#: numpy's scalars (rebuilt from a dtype and raw bytes; no code runs), which MMSegmentation
#: 0.x / MMDetection 2.x store in ``meta`` (e.g. ``hook_msgs['best_score']``, a numpy.float64).
NUMPY_SCALAR_GLOBALS = (np_multiarray.scalar, np.dtype) + tuple(
    type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8,
                                np.float16, np.float32, np.float64))

#: The classes a checkpoint may hold beyond tensors and plain values (``weights_only=True``'s
#: own list): the ``args`` of timm's / the official ``train.py``'s ``CheckpointSaver``, and
#: numpy scalars. fec_core's own checkpoints need none of them.
SAFE_GLOBALS = (argparse.Namespace,) + NUMPY_SCALAR_GLOBALS

#: A file saved under numpy 1 names the scalar by its old module (torch >= 2.6 takes aliases).
_ALIASES = [(np_multiarray.scalar, "numpy.core.multiarray.scalar")]

_TRUST = contextvars.ContextVar("fec_core_trust_checkpoints", default=False)


@contextlib.contextmanager
def trusted(enabled: bool = True) -> Iterator[None]:
    """Within the block, a checkpoint file that needs more than :data:`SAFE_GLOBALS` is
    unpickled in full (``weights_only=False``) instead of refused, with a warning naming what
    it needed. Unpickling runs any code the file carries: only for files whose source you
    trust. ``python -m fec_core.train`` / ``fec_core.visualize`` do this with
    ``--trust-checkpoint``; :func:`load_checkpoint` and :func:`read_file` take ``trust=True``."""
    token = _TRUST.set(bool(enabled))
    try:
        yield
    finally:
        _TRUST.reset(token)


def _is_safetensors(path: str) -> bool:
    """A ``.safetensors`` file (by name, or by its header: 8 bytes of length, then ``{``)."""
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def _first_sentence(e: BaseException) -> str:
    """The first sentence of ``e``'s message, on one line (torch's run on for a paragraph)."""
    return " ".join(str(e).split()).split(". ")[0].rstrip(".")


def _reason(e: BaseException) -> str:
    text = _first_sentence(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _unsafe_globals(path: str, e: BaseException) -> List[str]:
    """The globals a PyTorch file needs beyond the allowed ones (all of them when torch can
    list them statically, else the one its error names)."""
    with contextlib.suppress(Exception), _allowing_safe_globals():
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if found:
            return sorted(found)
    return re.findall(r"GLOBAL ([\w.]+)", str(e))[:1]


def _allowing_safe_globals():
    """:data:`SAFE_GLOBALS` allowed for ``weights_only=True`` (in a block with torch >= 2.5, for
    the process with 2.4; older versions allow no extra class)."""
    if hasattr(torch.serialization, "safe_globals"):
        aliases = _ALIASES if TorchVersion(torch.__version__) >= "2.6" else []
        return torch.serialization.safe_globals(list(SAFE_GLOBALS) + aliases)
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals(list(SAFE_GLOBALS))
    return contextlib.nullcontext()


def read_file(path: Union[str, os.PathLike], trust: bool = False) -> Any:
    """What a checkpoint file holds, read without running code.

    ``.safetensors``: a dict of tensors (``safetensors.torch.load_file``). A PyTorch file:
    ``torch.load(weights_only=True)`` allowing :data:`SAFE_GLOBALS`. A file that needs
    anything else raises :class:`CheckpointError` naming it, unless ``trust`` (or inside
    :func:`trusted`): then it is unpickled in full, which runs any code it carries, with a
    warning. A missing file raises ``FileNotFoundError``, a broken one ``CheckpointError``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty")
    if _is_safetensors(path):
        try:
            return load_file(path, device="cpu")
        except Exception as e:  # a bad header, truncated data, ...
            raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt or not a safetensors file "
                                  f"({_first_sentence(e)})") from e
    try:
        with _allowing_safe_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights only load failed" not in str(e).lower():  # truncated, not a torch file, ...
            raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt, truncated or not a PyTorch file "
                                  f"({_reason(e)})") from e
        globals_, refusal = _unsafe_globals(path, e), e
    needs = ", ".join(globals_) or "more than tensors and plain values"
    if not (trust or _TRUST.get()):
        if not globals_:
            found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?:\.\s|\n|$)", str(refusal))
            what = f"more than tensors and plain values ({found.group(1) if found else _reason(refusal)})"
        elif len(globals_) == 1:
            what = f"{needs}, which is not a tensor, number, string or container of them"
        else:
            what = f"{needs}, which are not tensors, numbers, strings or containers of them"
        raise CheckpointError(f"refusing to unpickle {path}: it needs {what}, and unpickling it could run code; "
                              f"if you trust the file's source, load it with trust=True (Python) or "
                              f"--trust-checkpoint (command line)")
    warnings.warn(f"{path} needs {needs}: unpickled in full because it is trusted (this runs any code the "
                  f"file carries)", stacklevel=2)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path} ({_reason(e)})") from e


def _read(source: Union[str, os.PathLike, Mapping], use_ema: bool,
          trust: bool = False) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        obj = read_file(path, trust)
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
    backbone, skipped = split_backbone(tensors)
    if skipped:
        warnings.warn(f"{path}: a full downstream checkpoint; loading its backbone ({len(backbone)} tensors), "
                      f"skipping {', '.join(skipped)} ({len(tensors) - len(backbone)} tensors)", stacklevel=3)
    return checkpoint_filter_fn(backbone), skipped


def read_state_dict(source: Union[str, os.PathLike, Mapping], use_ema: bool = False,
                    trust: bool = False) -> Dict[str, torch.Tensor]:
    """Read a checkpoint file (or dict) and return its state dict, prefixes stripped, keys mapped.

    Picks ``state_dict_ema`` when ``use_ema`` (and present), else ``model``, ``state_dict``,
    ``state_dict_ema``, else the dict itself. Of a full MMSeg / MMDet checkpoint only the
    backbone is kept (:func:`split_backbone`; one warning names what was skipped). A file is
    read by :func:`read_file` (no code runs unless ``trust``).
    """
    return _read(source, use_ema, trust)[0]


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


def _unwrap(model: nn.Module) -> FEC:
    """``model`` itself, or the FEC inside timm's ``features_only`` wrapper (``.model``)."""
    inner = model if isinstance(model, FEC) else getattr(model, "model", None)
    if not isinstance(inner, FEC):
        raise TypeError(f"checkpoints load into an fec_core FEC (or timm's features_only wrapper of one), "
                        f"got {type(model).__name__}")
    return inner


def _stage_of(key: str) -> Optional[int]:
    m = re.match(r"^(?:stages|out_norms)\.(\d+)\.", key)
    return int(m.group(1)) if m else None


def check_state_dict(model: FEC, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Compare a mapped state dict with ``model``; return what to load, or raise.

    Allowed on purpose: a classifier head whose shape differs from the model's (new
    number of classes: the model keeps its fresh head), a head or final norm that a
    head-less model does not have, the per-stage output norms of a dense model
    loaded from a classification checkpoint (they keep their fresh initialisation:
    GroupNorms with weight 1 and bias 0, which normalize each stage's output but do
    not rescale it; the downstream training learns them), and the stages a
    ``features_only`` model pruned (after its last ``out_indices``). Anything else
    missing, unexpected or of another shape raises :class:`CheckpointError`.
    ``model`` may be timm's ``features_only`` wrapper of an FEC.
    """
    model = _unwrap(model)
    own = model.state_dict()
    sd = dict(state_dict)
    notes, allowed_missing = [], set()
    n_stages = len(model.stages)
    pruned = [k for k in sd if (_stage_of(k) or 0) >= n_stages]
    if pruned:
        notes.append(f"stages {n_stages} and later not loaded: the model keeps only {n_stages} (features_only "
                     f"with out_indices before the last stage)")
        [sd.pop(k) for k in pruned]
        [sd.pop(k, None) for k in ("norm.weight", "norm.bias")]
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
    if not out_norms and any(k.startswith("out_norms.") for k in sd):
        raise CheckpointError("this checkpoint holds per-stage output norms (a dense-prediction backbone, "
                              "official norm0..norm6): load it into a dense model, "
                              "timm.create_model(name, features_only=True) or FEC(..., dense=True)")
    raise_if_mismatch(own, sd, "checkpoint does not fit this model (is it another FEC variant or setting?)",
                      allowed_missing)
    for note in notes:
        warnings.warn(note, stacklevel=3)
    return sd


def load_checkpoint(model: nn.Module, source: Union[str, os.PathLike, Mapping], use_ema: bool = False,
                    report: bool = False, trust: bool = False):
    """Load an official (or fec_core) checkpoint into ``model``; see :func:`check_state_dict`.

    ``model``: an :class:`~fec_core.FEC` or timm's ``features_only`` wrapper of one.
    ``source``: a path (a PyTorch file or ``.safetensors``, read by :func:`read_file`: no code
    runs unless ``trust=True``) or an already loaded dict; a full MMSegmentation /
    MMDetection checkpoint gives its backbone (:func:`split_backbone`, one warning names the
    skipped prefixes). Returns ``model``, or with ``report=True`` ``(model, skipped)``,
    ``skipped`` the sorted non-backbone prefixes left out (``[]`` for a backbone-only one).
    """
    fec = _unwrap(model)
    sd, skipped = _read(source, use_ema, trust)
    sd = check_state_dict(fec, sd)
    fec.load_state_dict(sd, strict=False)
    return (model, skipped) if report else model
