"""The package's structure: every module of fec_core imports alone, in an interpreter where no
other module of fec_core was imported before it (an import cycle shows only in some order), no
module re-exports names through a module ``__getattr__``, and no module imports another
module's private names."""
import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fec_core

PACKAGE = Path(fec_core.__file__).parent


def _modules():
    """Every module of the package by its dotted name (entry points ``__main__`` left out: they run)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


#: A child process per module, forked after the third-party libraries are loaded (so each child
#: starts with no fec_core module imported and costs a fraction of a second, not a new torch).
CHILD = textwrap.dedent("""
    import importlib, os, sys, traceback
    import matplotlib, numpy, PIL.Image, scipy, sklearn.cluster, timm, torch, torchvision, tqdm  # noqa: F401
    failed = []
    for name in sys.argv[1:]:
        pid = os.fork()
        if pid == 0:
            try:
                module = importlib.import_module(name)
                if "__getattr__" in vars(module):
                    print(f"{name} defines a module __getattr__", file=sys.stderr)
                    os._exit(1)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        if os.waitpid(pid, 0)[1] != 0:
            failed.append(name)
    print("FAILED " + " ".join(failed) if failed else "OK")
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child per module")
@pytest.mark.process
def test_every_module_imports_alone_without_a_module_getattr():
    modules = _modules()
    assert len(modules) > 30 and "fec_core.interpret" in modules and "fec_core.train.loop" in modules
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, *modules], capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "OK", proc.stdout + proc.stderr[-4000:]


def test_no_module_imports_another_modules_private_names():
    """``from .x import _name`` would tie a module to another's internals: a name used across
    modules is public where it is defined."""
    private = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                private += [f"{path.relative_to(PACKAGE)}: from {'.' * node.level}{node.module or ''} import {a.name}"
                            for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not private, private
