"""What chapters 3-5 (centers, similarity, assignment) rely on and the core tests do not check:

* the *values* and the layout of ``forward_with_clusters`` records with several images, heads
  and fold regions (``[B, heads, fold_w, fold_h, w, h]`` for encode layers,
  ``[B, fold_w, fold_h, w, h]`` for pooling), recomputed independently per image, head and
  region with plain PyTorch ops, on a non-square input and with a negative ``sim_alpha``;
* the tie rule (the first of equal scores wins) in every assignment path, with exact ties.
"""
import pytest
import torch
import torch.nn.functional as F

from fec_core import FEC
from fec_core import clustering as cl

TINY_FOLDED = dict(layers=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), mlp_ratios=(2, 2, 2, 2), heads=(2, 2, 2, 2),
                   head_dim=(4, 4, 4, 4), proposal=((2, 3), (2, 2), (2, 2), (1, 1)), fold=(2, 2, 1, 1),
                   num_classes=4)


def _cosine(region_keys, grid):
    """Keys of one region [C, w, h] -> cosine of every center (adaptive pooling) with every point, [M, N]."""
    ck = F.adaptive_avg_pool2d(region_keys[None], grid)[0].flatten(1).T  # [M, C]
    pk = region_keys.flatten(1).T  # [N, C]
    return F.normalize(ck, dim=1) @ F.normalize(pk, dim=1).T


@pytest.mark.parametrize("literal", [False, True])
def test_records_hold_the_assignment_of_every_image_head_and_region(literal):
    torch.manual_seed(0)
    model = FEC(**TINY_FOLDED, literal=literal).double().eval()
    mixer = model.stages[0].blocks[0].token_mixer
    with torch.no_grad():
        mixer.sim_alpha.fill_(-0.8)  # the gate decreases with similarity: the argmax is an argmin of cos
        mixer.sim_beta.fill_(0.3)
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)  # stage-1 map 16x24, regions 8x12
    with torch.no_grad():
        _, records = model.forward_with_clusters(x)
        enc, pool = records[0], next(r for r in records if r.kind == "pool")
        keys = mixer.f(model.stages[0].blocks[0].norm1(model.stem(x)))  # [2, 2 * 4, 16, 24]
        pool_keys = model.stages[1].downsample.conv_f(model.stages[0](model.stem(x)))  # [2, 16, 16, 24]

    assert enc.name == "stages.0.blocks.0.token_mixer" and enc.grid == (2, 3) and enc.fold == (2, 2)
    assert tuple(enc.index.shape) == (2, 2, 2, 2, 8, 12)
    assert tuple(pool.index.shape) == (2, 2, 2, 8, 12) and pool.grid == (4, 6)
    changed = False
    for b in range(2):
        for p in range(2):
            for q in range(2):
                rows, cols = slice(8 * p, 8 * p + 8), slice(12 * q, 12 * q + 12)
                for e in range(2):
                    cos = _cosine(keys[b, 4 * e:4 * e + 4, rows, cols], (2, 3))
                    want = torch.sigmoid(mixer.sim_beta + mixer.sim_alpha * cos).argmax(0)
                    assert torch.equal(enc.index[b, e, p, q].flatten(), want), (b, e, p, q)
                    assert torch.equal(want, cos.argmin(0))  # alpha < 0: the least similar center
                    changed = changed or not torch.equal(want, cos.argmax(0))
                want_pool = _cosine(pool_keys[b, :, rows, cols], (4, 6)).argmax(0)
                assert torch.equal(pool.index[b, p, q].flatten(), want_pool), (b, p, q)
    assert changed  # the negative alpha really changed the assignment


def test_ties_go_to_the_first_center_in_every_path():
    # Exact ties: integer keys whose normalized products are exact in any summation order.
    ck = torch.tensor([[[1., 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]])  # 0 == 2, 1 == 3
    pk = torch.tensor([[[2., 0, 0, 0], [0, 3, 0, 0], [0, 0, 0, 1], [1, 1, 0, 0], [0, 0, 5, 0]]])
    want = torch.tensor([[0, 1, 0, 0, 4]])
    cos = cl.similarity(ck, pk)
    assert torch.equal(cl.assign(cos)[1], want)
    for budget in (1, 2, 3, 7, 1 << 20):  # tiles over points and over centers
        assert torch.equal(cl.assign_nearest(ck, pk, max_elements=budget), want), budget
    # alpha = 0: every gate value is sigmoid(beta), all centers tie, every point goes to center 0
    _, idx = cl.assign(cl.gate(cos, torch.zeros(1), torch.tensor([1.5])))
    assert torch.equal(idx, torch.zeros_like(idx))


def test_flat_regions_tie_the_same_way_in_literal_and_fast_pooling():
    # A constant patch makes all of its 2x2 centers identical: both paths must send its points
    # to the same (first) center, or literal and fast models would disagree on flat images.
    keys = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    keys[:, :, :4, :] = 1.0  # flat top half
    values = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    rep_fast, idx_fast = cl.cluster_pool(keys, values, literal=False)
    rep_lit, idx_lit = cl.cluster_pool(keys, values, literal=True)
    assert torch.equal(idx_fast, idx_lit)
    torch.testing.assert_close(rep_fast, rep_lit)
    top = idx_fast.reshape(2, 8, 8)[:, :4]
    assert torch.equal(top, torch.zeros_like(top))  # first of the tied (flat) centers
