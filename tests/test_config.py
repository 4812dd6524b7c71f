"""fec_core.config: the one place of the backend switches, read by clustering and kernels."""
import os
import subprocess
import sys

import pytest
import torch

from fec_core import clustering as cl
from fec_core import config, kernels


def test_clustering_and_kernels_read_the_one_config():
    before = config.kernel_mode()
    try:
        config.set_kernel_mode("off")
        assert kernels.mode() == "off"
        c = torch.nn.functional.normalize(torch.randn(1, 4, 8), dim=-1)
        assert not kernels.use_kernel(c, c)
        kernels.set_mode("auto")
        assert config.kernel_mode() == "auto"
    finally:
        config.set_kernel_mode(before)
    config.set_scatter_backend("torch")
    assert cl.scatter_backend() == "torch"
    with pytest.raises(ValueError, match="unknown scatter backend"):
        cl.set_scatter_backend("cuda")
    with pytest.raises(ValueError, match="unknown kernel mode"):
        kernels.set_mode("fast")


def test_environment_variables_and_their_fallback():
    code = "from fec_core import config; print(config.kernel_mode(), config.scatter_backend())"
    env = dict(os.environ, FEC_KERNELS="off", FEC_SCATTER_BACKEND="no_such_backend")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["off", "torch"]
