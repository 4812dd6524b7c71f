"""Checks shared by the unit tests (tests/) and the book's tests (book/test_book.py)."""
import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests of tests/ marked slow (python3 dev.py test does)")


def pytest_configure(config):
    """With FEC_EXPECT_CPU_CAPABILITY set (``python3 dev.py test --cpu-compat``), stop at once
    unless PyTorch really runs that CPU code path: a setting that did not take would test
    nothing new."""
    want = os.environ.get("FEC_EXPECT_CPU_CAPABILITY")
    if not want:
        return
    import torch

    got = torch.backends.cpu.get_cpu_capability()
    if got != want:
        pytest.exit(f"FEC_EXPECT_CPU_CAPABILITY={want} but PyTorch runs {got} kernels "
                    f"(ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY')!r})", returncode=3)
