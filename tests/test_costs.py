"""fec_core.costs: parameter and multiply-accumulate counts (book chapter 9)."""
import pytest
import torch
import torch.nn as nn

from conftest import tiny_fec
from fec_core.costs import count_macs, count_params, macs_breakdown, macs_by_module, macs_by_operator


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.conv(x).mean((-2, -1)))


def test_macs_of_known_layers():
    m = TwoLayers()
    # conv: 8 outputs x 3*3*3 inputs per output x 16*16 positions; linear: 8 x 5
    conv, fc = 8 * 27 * 16 * 16, 8 * 5
    assert count_macs(m, (16, 16)) == conv + fc
    assert count_macs(m, (2, 3, 16, 16)) == 2 * (conv + fc)
    b = macs_breakdown(m, 16)
    assert b.by_module == {"conv": conv, "fc": fc}
    assert b.by_operator == {"convolution": conv, "addmm": fc}
    assert count_params(m) == 8 * 27 + 8 + 8 * 5 + 5
    m.fc.weight.requires_grad_(False)
    assert count_params(m, trainable_only=True) == 8 * 27 + 8 + 5


def test_breakdown_adds_up_and_restores_training_mode():
    m = tiny_fec().train()
    b = macs_breakdown(m, 64)
    assert m.training, "counting must not leave the model in eval mode"
    stages = macs_by_module(m, 64, depth=2)
    assert list(stages) == ["stem.proj", "stages.0", "stages.1", "stages.2", "stages.3"]
    assert sum(stages.values()) + b.by_module["head"] == b.total
    assert sum(b.by_operator.values()) == b.total == count_macs(m, 64)
    assert b.by_operator["bmm"] > 0  # the cosine similarities
    assert macs_by_operator(m, 64) == b.by_operator
    # 4x the points: 4x the MACs of convolutions, MLPs and encode similarities (fixed centers),
    # 16x those of the pooling similarities (N/4 centers for N points)
    big = macs_breakdown(m, 128)
    assert big.by_operator["convolution"] == 4 * b.by_operator["convolution"]
    assert big.by_module["stages.0.blocks.0.token_mixer"] == 4 * b.by_module["stages.0.blocks.0.token_mixer"]
    assert big.total > 4 * b.total


def test_bad_input_sizes():
    m = TwoLayers()
    with pytest.raises(ValueError, match="input_size"):
        count_macs(m, (1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="input_size"):
        count_macs(m, (0, 16))
    with pytest.raises(ValueError, match="depth"):
        macs_by_module(m, 16, depth=0)
