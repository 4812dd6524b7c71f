#!/usr/bin/env python3
"""The project's two commands, with nothing but Python 3.10+ needed to start them.

    python3 dev.py book   # set up .venv, execute every chapter, build the site (_build/html)
    python3 dev.py test   # set up .venv, unit tests, every notebook once (alone, outputs compared), site
    python3 dev.py test --cpu-compat   # the same (without the site and process tests) on another CPU code path
    python3 dev.py book --cpu-compat   # the chapters on that code path, two at a time
    python3 dev.py book --loaded       # any command while another program keeps one core busy

``--cpu-compat`` sets ``MKL_CBWR=COMPATIBLE`` (MKL's portable code path) and
``ATEN_CPU_CAPABILITY=default`` (PyTorch's non-vectorized kernels), the arithmetic a reader
with another CPU may get; the tests check that the setting took
(``torch.backends.cpu.get_cpu_capability() == 'DEFAULT'``). ``--loaded`` runs the command while a second process keeps one CPU core busy, the machine
of a reader who has other work running: the chapters' live timings must pass there too.
``.ci/run`` runs the book command and both test configurations.

Both create ``.venv`` (``python3 -m venv``) and install ``fec_core`` with its ``book``
and ``dev`` extras on first use, and again whenever ``pyproject.toml`` changes.
``test`` also installs Debian's chromium and chromedriver (for the site's browser
test) when they are missing and it runs as root with apt-get available.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
STAMP = VENV / ".installed-stamp"


#: Another CPU code path (``test --cpu-compat``): MKL's portable path, PyTorch's scalar kernels.
CPU_COMPAT = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default", "FEC_EXPECT_CPU_CAPABILITY": "DEFAULT"}


def run(cmd, **kw) -> int:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.call([str(c) for c in cmd], cwd=ROOT, **kw)


def ensure_venv() -> None:
    if sys.version_info < (3, 10):
        sys.exit(f"Python 3.10 or newer is needed (this is {sys.version.split()[0]})")
    pyproject = ROOT / "pyproject.toml"
    if PY.exists() and STAMP.exists() and STAMP.stat().st_mtime >= pyproject.stat().st_mtime:
        return
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        try:
            venv.create(VENV, with_pip=True)
        except Exception as e:  # e.g. Debian without python3-venv
            sys.exit(f"could not create a virtual environment ({e}); on Debian/Ubuntu: apt-get install python3-venv")
    steps = [
        [PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
        [PY, "-m", "pip", "install", "--quiet", "-e", ".[book,dev]"],
        [PY, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"],
    ]
    for cmd in steps:
        if run(cmd) != 0:
            sys.exit(f"setup failed: {' '.join(map(str, cmd))}")
    STAMP.touch()


def ensure_browser() -> None:
    script = ROOT / "scripts" / "ensure-browser.sh"
    if script.exists() and not (shutil.which("chromium") and shutil.which("chromedriver")):
        run(["bash", script])


class _BusyCore:
    """A process that keeps one CPU core busy while the command runs (``--loaded``)."""

    def __enter__(self):
        print("+ a second process keeps one core busy (--loaded)", flush=True)
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("book", "site", "test", "setup"):
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if "--loaded" in rest:
        rest.remove("--loaded")
        with _BusyCore():
            return main([cmd, *rest])
    ensure_venv()
    env = dict(os.environ, PYDEVD_DISABLE_FILE_VALIDATION="1")
    env.pop("MPLBACKEND", None)  # notebooks draw with the inline backend; a global Agg would drop their figures
    if cmd == "setup":
        return 0
    compat = "--cpu-compat" in rest
    if compat:
        rest.remove("--cpu-compat")
        env.update(CPU_COMPAT)
    if cmd == "book":
        return run([PY, "scripts/bookbuild.py", "build", "--execute", *rest], env=env)
    if cmd == "site":
        return run([PY, "scripts/bookbuild.py", "build", *rest], env=env)
    pytest = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", "book/test_book.py", "--run-slow"]
    if os.cpu_count() and os.cpu_count() > 1:  # one worker per core; the site's tests stay on one
        pytest += ["-n", str(min(os.cpu_count(), 4)), "--dist", "loadgroup"]
        env.setdefault("OMP_NUM_THREADS", "1")  # workers side by side, not threads fighting for cores
    if compat:
        # the site, and processes, signals, files and command lines, do not depend on the
        # CPU's arithmetic: the first configuration runs them
        pytest += ["-m", "not browser and not process"]
    else:
        ensure_browser()
    return run([*pytest, *rest], env=env)


if __name__ == "__main__":
    sys.exit(main())
