"""The backend switches of fec_core, in one place (as timm's ``layers/config.py``); chapter 12.

Two optional backends serve the fast clustering path:

* the **scatter backend** of :func:`fec_core.clustering.aggregate`: ``'torch'`` (native
  ``scatter_add_``, the default) or ``'torch_scatter'`` (the optional ``torch-scatter``
  package). Environment variable ``FEC_SCATTER_BACKEND``; :func:`set_scatter_backend`.
* the **kernel mode** of the fused Triton kernels (:mod:`fec_core.kernels`: the pooling
  assignment of :func:`fec_core.clustering.assign_nearest` and the encode step of
  :func:`fec_core.clustering.cluster_encode`): ``'auto'`` (on CUDA tensors when Triton is
  installed, the default), ``'off'`` (never) or ``'on'`` (also on CPU tensors, in Triton's
  interpreter). Environment variable ``FEC_KERNELS``; :func:`set_kernel_mode`.

An environment variable is read once, at import; an unknown or unusable value falls back to
the default. The setters raise a ``ValueError`` for an unknown name and an ``ImportError``
when the backend is not installed.
"""
from __future__ import annotations

import os

__all__ = ["HAS_TORCH_SCATTER", "HAS_TRITON", "INTERPRET", "SCATTER_BACKENDS", "KERNEL_MODES",
           "scatter_backend", "set_scatter_backend", "kernel_mode", "set_kernel_mode"]

try:  # optional, detected at import
    import torch_scatter  # type: ignore # noqa: F401
    HAS_TORCH_SCATTER = True
except Exception:  # pragma: no cover - depends on the environment
    HAS_TORCH_SCATTER = False

try:  # optional: Triton ships with CUDA builds of PyTorch
    import triton  # noqa: F401
    import triton.language  # noqa: F401
    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

#: True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

SCATTER_BACKENDS = ("torch", "torch_scatter")
KERNEL_MODES = ("auto", "off", "on")


def _from_env(variable: str, allowed, default: str) -> str:
    value = os.environ.get(variable, default)
    return value if value in allowed else default


_scatter = _from_env("FEC_SCATTER_BACKEND", SCATTER_BACKENDS, "torch")
if _scatter == "torch_scatter" and not HAS_TORCH_SCATTER:
    _scatter = "torch"
_kernel_mode = _from_env("FEC_KERNELS", KERNEL_MODES, "auto")


def scatter_backend() -> str:
    """Name of the backend used by :func:`fec_core.clustering.aggregate`: ``'torch'`` or
    ``'torch_scatter'``."""
    return _scatter


def set_scatter_backend(name: str) -> None:
    """Choose the scatter backend: ``'torch'`` (native ``scatter_add_``, the default)
    or ``'torch_scatter'`` (needs the optional ``torch-scatter`` package)."""
    global _scatter
    if name not in SCATTER_BACKENDS:
        raise ValueError(f"unknown scatter backend {name!r}; use 'torch' or 'torch_scatter'")
    if name == "torch_scatter" and not HAS_TORCH_SCATTER:
        raise ImportError("torch-scatter is not installed: pip install 'fec-core[scatter]'")
    _scatter = name


def kernel_mode() -> str:
    """When the Triton kernels are used: ``'auto'`` (CUDA tensors), ``'off'``, ``'on'`` (also CPU)."""
    return _kernel_mode


def set_kernel_mode(name: str) -> None:
    """Choose when the fast path uses the Triton kernels (the pooling assignment of
    :func:`fec_core.clustering.assign_nearest`, the encode step of
    :func:`fec_core.clustering.cluster_encode`): ``'auto'`` (on CUDA tensors when Triton is
    installed), ``'off'`` (never), or ``'on'`` (also on CPU tensors: needs Triton's
    interpreter, ``TRITON_INTERPRET=1``)."""
    global _kernel_mode
    if name not in KERNEL_MODES:
        raise ValueError(f"unknown kernel mode {name!r}; use 'auto', 'off' or 'on'")
    if name == "on" and not HAS_TRITON:
        raise ImportError("Triton is not installed: pip install triton")
    _kernel_mode = name
