"""fec_core: FEC (feature extraction with clustering, CVPR 2024) as a small, tested library.

* :mod:`fec_core.clustering`: the equations, one function per concept.
* :mod:`fec_core.config`: the backend switches (scatter backend, Triton kernel mode).
* :mod:`fec_core.numerics`: the numerical contract of the argmax (tolerances, checks).
* :mod:`fec_core.layers`: stem, clustering encode / pool layers, blocks.
* :mod:`fec_core.model`: the backbone, ``fec_small`` / ``fec_base`` / ``fec_large`` (timm models);
  :mod:`fec_core.records`: the assignments of a forward pass (``forward_with_clusters``).
* :mod:`fec_core.checkpoint`: loading released official checkpoints.
* :mod:`fec_core.data`: offline data (the bundled photograph, ``digits``, ``shapes``, image folders).
* :mod:`fec_core.train`: the training loop (``python -m fec_core.train``), DDP through torchrun.
* :mod:`fec_core.interpret` / :mod:`fec_core.visualize`: cluster maps traced to pixels, figures, CLI;
  :mod:`fec_core.foreground`: unsupervised foreground segmentation and its baselines;
  :mod:`fec_core.regions`: the k-means both use.
* :mod:`fec_core.seg`: Semantic FPN head, segmentation on ``shapes``, a torchvision detection backbone.
* :mod:`fec_core.kernels` / :mod:`fec_core.bench`: the Triton kernels (optional) and the benchmark.
* :mod:`fec_core.costs`: parameter and MAC counting. :mod:`fec_core.figures`: light figures.

The book's build tooling is ``scripts/bookbuild.py`` in the repository, not part of the package.

Importing ``fec_core`` registers the variants with timm.
"""
import warnings as _warnings

# timm imports huggingface_hub, which imports tqdm.auto: inside Jupyter without ipywidgets that
# prints "IProgress not found" on stderr at import. fec_core's own bars do not need widgets.
with _warnings.catch_warnings():
    _warnings.filterwarnings("ignore", message="IProgress not found")
    import timm as _timm  # noqa: F401

from . import clustering, numerics
from .checkpoint import CheckpointError, load_checkpoint, read_state_dict
from .clustering import (aggregate, aggregate_literal, assign, assign_nearest, centers, cluster_encode,
                         cluster_pool, dispatch, dispatch_literal, gate, one_hot, similarity)
from .layers import ClusterBlock, ClusterEncode, ClusterPool, Stem
from .model import (FEC, SETTINGS, VARIANTS, checkpoint_filter_fn, fec_base, fec_base_det, fec_base_seg,
                    fec_large, fec_large_det, fec_large_seg, fec_small, fec_small_det, fec_small_seg, fec_tiny)
from .records import ClusterRecord

__version__ = "0.2.0"  # the same as pyproject.toml (book/test_book.py checks)


def create_model(name: str = "fec_small", **kwargs) -> FEC:
    """Shortcut for ``timm.create_model(name, **kwargs)`` restricted to FEC variants."""
    if not name.startswith("fec_"):
        raise ValueError(f"{name!r} is not an FEC model; choose one of {_timm.list_models('fec_*')}")
    return _timm.create_model(name, **kwargs)
