"""The numerical contract of FEC's hard assignments (book chapters 5 and 12).

Every clustering layer takes an argmax over similarity scores (Eq. 5). Two
computations of those scores that do *different arithmetic* (a whole matrix
product against a tiled one, a Triton kernel against cuBLAS or MKL, half against
float, one thread against two, AVX-512 against AVX2) round differently, so when
two centers score within a rounding step of each other either may win. What every
path of ``fec_core`` promises, and what the tests and chapters check:

* **same arithmetic, same bits**: the literal and the fast path of one layer on one
  machine use identical similarities for encode layers, and the golden tensors of
  the official code are reproduced exactly;
* **different arithmetic, within a bound**: a picked center is correct when its
  score is within ``atol`` of the best score, and the pick must be *the* argmax
  wherever the best and the second-best scores are farther apart than ``atol``.
  Ties between duplicated centers are a property of the data: no promise is made
  about which copy wins.

:func:`tolerance` gives the default ``atol`` per dtype, :func:`assignment_report`
counts what a candidate assignment gets right and wrong, and
:func:`assert_assignments_close` raises with a readable message.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["tolerance", "near_ties", "AssignmentReport", "assignment_report", "assert_assignments_close"]

#: Default bound on the difference between two computations of one cosine similarity
#: (unit vectors, float32 accumulation). float32: about 80 units in the last place of
#: 1.0, far above the few ulps that reordering a sum of a few hundred products costs;
#: half and bfloat16: two rounding steps of the stored result near 1.0.
_TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2 * 2.0 ** -10,
    torch.bfloat16: 2 * 2.0 ** -7,
}


def tolerance(dtype: torch.dtype) -> float:
    """The default rounding bound ``atol`` for cosine similarities computed in ``dtype``.

    >>> tolerance(torch.float32)
    1e-05
    """
    if dtype not in _TOLERANCE:
        raise TypeError(f"no rounding bound for {dtype}; use one of {sorted(map(str, _TOLERANCE))}")
    return _TOLERANCE[dtype]


def near_ties(scores: torch.Tensor, atol: float, dim: int = 1) -> torch.Tensor:
    """Points whose best and second-best scores are within ``atol``.

    ``scores`` [..., M, ...] with the centers along ``dim`` -> bool tensor without
    ``dim``. With a single center nothing is a tie.
    """
    if scores.shape[dim] < 2:
        return torch.zeros_like(scores.select(dim, 0), dtype=torch.bool)
    top2 = scores.topk(2, dim=dim).values
    return (top2.select(dim, 0) - top2.select(dim, 1)) <= atol


@dataclass
class AssignmentReport:
    """What :func:`assignment_report` found.

    ``points``: assignments checked. ``wrong``: picks whose score is more than ``atol``
    below the best (always a bug). ``ties``: points whose two best centers are within
    ``atol`` (either may win). ``tie_changes``: points where the candidate differs from
    ``expected`` inside such a near-tie (allowed). ``changes``: points where it differs
    from ``expected`` outside a near-tie (a bug). ``max_shortfall``: the largest
    ``best - picked`` score seen.
    """

    points: int
    wrong: int
    ties: int
    tie_changes: int
    changes: int
    max_shortfall: float
    atol: float

    @property
    def ok(self) -> bool:
        return self.wrong == 0 and self.changes == 0

    def __str__(self) -> str:
        return (f"{self.points} points: {self.wrong} picks more than {self.atol:g} below the best "
                f"(max shortfall {self.max_shortfall:.3g}), {self.changes} changed outside a near-tie, "
                f"{self.tie_changes} of {self.ties} near-ties resolved differently")


def assignment_report(scores: torch.Tensor, index: torch.Tensor, expected: Optional[torch.Tensor] = None,
                      atol: Optional[float] = None, dim: int = 1) -> AssignmentReport:
    """Check an assignment ``index`` against reference ``scores`` (the contract above).

    ``scores`` [..., M, ...] (centers along ``dim``; best computed in high precision,
    e.g. float64), ``index`` the candidate argmax (``scores`` without ``dim``),
    ``expected`` optionally another path's argmax of the same shape. ``atol``
    defaults to :func:`tolerance` of ``scores.dtype``.
    """
    if index.shape != scores.select(dim, 0).shape:
        raise ValueError(f"index {tuple(index.shape)} does not fit scores {tuple(scores.shape)} "
                         f"with centers along dim {dim}")
    if expected is not None and expected.shape != index.shape:
        raise ValueError(f"expected {tuple(expected.shape)} and index {tuple(index.shape)} differ in shape")
    atol = tolerance(scores.dtype) if atol is None else float(atol)
    index = index.to(scores.device)
    best = scores.max(dim=dim).values
    picked = scores.gather(dim, index.unsqueeze(dim).long()).squeeze(dim)
    shortfall = best - picked
    ties = near_ties(scores, atol, dim)
    changes = tie_changes = 0
    if expected is not None:
        differ = index != expected.to(index.device)
        changes = int((differ & ~ties).sum())
        tie_changes = int((differ & ties).sum())
    return AssignmentReport(points=index.numel(), wrong=int((shortfall > atol).sum()), ties=int(ties.sum()),
                            tie_changes=tie_changes, changes=changes,
                            max_shortfall=float(shortfall.max()) if index.numel() else 0.0, atol=atol)


def assert_assignments_close(scores: torch.Tensor, index: torch.Tensor, expected: Optional[torch.Tensor] = None,
                             atol: Optional[float] = None, dim: int = 1, msg: str = "") -> AssignmentReport:
    """Raise ``AssertionError`` unless ``index`` keeps the contract (see :func:`assignment_report`);
    returns the report."""
    report = assignment_report(scores, index, expected, atol, dim)
    if not report.ok:
        raise AssertionError(f"{msg + ': ' if msg else ''}assignments break the numerical contract: {report}")
    return report
