"""fec_core.numerics: the argmax contract used by the tests and the book."""
import pytest
import torch
import torch.nn.functional as F

from fec_core import clustering as cl
from fec_core.numerics import assert_assignments_close, assignment_report, near_ties, tolerance


def test_tolerance_per_dtype_and_unknown_dtype():
    assert tolerance(torch.float32) < tolerance(torch.float16) < tolerance(torch.bfloat16)
    with pytest.raises(TypeError, match="int64"):
        tolerance(torch.int64)


def test_exact_argmax_passes_and_a_wrong_pick_fails():
    scores = torch.tensor([[[0.9, 0.1], [0.2, 0.8]]], dtype=torch.float64)  # [B=1, M=2, N=2]
    good = scores.argmax(dim=1)
    assert assert_assignments_close(scores, good).ok
    bad = 1 - good
    report = assignment_report(scores, bad)
    assert report.wrong == 2 and not report.ok
    with pytest.raises(AssertionError, match="numerical contract"):
        assert_assignments_close(scores, bad, msg="layer x")


def test_near_ties_may_go_either_way_but_clear_wins_may_not():
    scores = torch.tensor([[[0.5, 0.9], [0.5 + 1e-9, 0.1]]], dtype=torch.float64)
    assert near_ties(scores, 1e-6).tolist() == [[True, False]]
    other = torch.tensor([[0, 0]])       # point 0: the other copy of a near-tie, point 1: right
    report = assert_assignments_close(scores, other, expected=scores.argmax(dim=1), atol=1e-6)
    assert (report.ties, report.tie_changes, report.changes) == (1, 1, 0)
    wrong = torch.tensor([[1, 1]])       # point 1 picks a center 0.8 below the best
    report = assignment_report(scores, wrong, expected=scores.argmax(dim=1), atol=1e-6)
    assert report.changes == 1 and report.wrong == 1


def test_duplicated_centers_are_ties_for_every_tiling():
    """The case that broke on other CPUs: every center twice, tiles split over the centers."""
    g = torch.Generator().manual_seed(0)
    ck = torch.randn(2, 196, 24, generator=g)
    pk = torch.randn(2, 784, 24, generator=g)
    twice = torch.cat([ck, ck], dim=1)
    scores = cl.similarity(twice.double(), pk.double())
    dense = cl.assign(cl.similarity(twice, pk))[1]
    for budget in (5_000, 50_000, 1 << 24):
        index = cl.assign_nearest(twice, pk, max_elements=budget)
        assert_assignments_close(scores, index, expected=dense, atol=tolerance(torch.float32))
    # reduced modulo the copies, every tiling names the same original center
    assert torch.equal(index % 196, dense % 196)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="does not fit"):
        assignment_report(torch.zeros(1, 3, 4), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="differ in shape"):
        assignment_report(torch.zeros(1, 3, 4), torch.zeros(1, 4, dtype=torch.long),
                          expected=torch.zeros(1, 3, dtype=torch.long))


def test_half_precision_matmul_within_the_half_bound():
    g = torch.Generator().manual_seed(1)
    ck = F.normalize(torch.randn(3, 49, 16, generator=g), dim=-1)
    pk = F.normalize(torch.randn(3, 200, 16, generator=g), dim=-1)
    scores = torch.matmul(pk.double(), ck.double().transpose(1, 2)).transpose(1, 2)  # [B, M, N]
    half = torch.matmul(pk.half().float(), ck.half().float().transpose(1, 2)).half().max(-1)[1]
    assert_assignments_close(scores, half, expected=scores.argmax(1), atol=tolerance(torch.float16))
