"""fec_core.config: the one place of the backend switches; what clustering and the kernels do
follows it."""
import os
import subprocess
import sys

import pytest
import torch

from fec_core import clustering as cl
from fec_core import config, kernels


def test_the_kernel_mode_decides_what_serves_a_tensor():
    """With the kernels off neither fused kernel serves anything; 'auto' leaves CPU tensors to
    the PyTorch paths; unknown modes are refused."""
    c = torch.nn.functional.normalize(torch.randn(1, 4, 8), dim=-1)
    keys, values, alpha, beta = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4), torch.ones(1), torch.zeros(1)
    before = config.kernel_mode()
    try:
        config.set_kernel_mode("off")
        assert not kernels.use_kernel(c, c) and not kernels.use_encode_kernel(keys, values, 4, alpha, beta)
        config.set_kernel_mode("auto")
        assert not kernels.use_kernel(c, c)  # a CPU tensor, outside the interpreter
        with pytest.raises(ValueError, match="unknown kernel mode"):
            config.set_kernel_mode("fast")
        assert config.kernel_mode() == "auto"  # a refused value changes nothing
    finally:
        config.set_kernel_mode(before)


def test_the_scatter_backend_is_what_aggregate_uses():
    """The native backend is the default and gives aggregate's sums; the optional one is refused
    with the command that installs it when it is missing, and unknown names are refused."""
    assert config.scatter_backend() == cl.scatter_backend() == "torch"
    v, c, idx = torch.randn(2, 6, 3), torch.randn(2, 2, 3), torch.tensor([[0, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1]])
    out = cl.aggregate(v, c, idx)
    assert torch.allclose(out[1, 0], c[1, 0]) and torch.allclose(out[1, 1], (c[1, 1] + v[1].sum(0)) / 7)
    if not config.HAS_TORCH_SCATTER:
        with pytest.raises(ImportError, match="pip install"):
            config.set_scatter_backend("torch_scatter")
    with pytest.raises(ValueError, match="unknown scatter backend"):
        config.set_scatter_backend("cuda")
    assert config.scatter_backend() == "torch"


@pytest.mark.process
def test_environment_variables_and_their_fallback():
    """FEC_KERNELS and FEC_SCATTER_BACKEND are read once, at import; an unknown value falls back
    to the default. FEC_KERNELS=on serves CPU tensors in Triton's interpreter, =off never."""
    code = ("import torch; from fec_core import config, kernels; c = torch.ones(1, 2, 4) / 2; "
            "print(config.kernel_mode(), config.scatter_backend(), kernels.use_kernel(c, c))")
    for value, expect in (("off", ["off", "torch", "False"]), ("on", ["on", "torch", str(config.HAS_TRITON)])):
        env = dict(os.environ, FEC_KERNELS=value, FEC_SCATTER_BACKEND="no_such_backend", TRITON_INTERPRET="1")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == expect, out.stdout
