"""Execute, clean and build the book's notebooks (a tool of this repository, not of fec_core).

    python scripts/bookbuild.py execute book/03_centers.ipynb   # run in place, store clean outputs
    python scripts/bookbuild.py clean book/*.ipynb               # strip execution counts / volatile metadata
    python scripts/bookbuild.py build [--execute]                 # build the site (stored or fresh outputs)
    python scripts/bookbuild.py build --out /tmp/site --toc /tmp/toc.yml   # elsewhere, other chapters

``build --execute`` (the README's ``make book``) copies the book to ``_build/src``,
executes every chapter there and builds the site from that copy, so the working
tree's stored outputs (checked by ``pytest --nbval``) are left as they are.

The site's one Sphinx extension of its own is ``book/_ext/dedupe_scripts.py``.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, List

ROOT = Path(__file__).resolve().parent.parent
VOLATILE_CELL_META = ("execution", "collapsed", "scrolled", "ExecuteTime")


def clean_notebook(nb) -> None:
    """Number code cells 1..n and strip volatile metadata in place (keeps tags and outputs).

    Counts are renumbered rather than cleared: nbval treats a cell without an
    execution count as never run and refuses its stored outputs.
    """
    nb.metadata.pop("widgets", None)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    count = 0
    for cell in nb.cells:
        for key in VOLATILE_CELL_META:
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            count += 1
            cell.execution_count = count
            cell.outputs = _merged_streams(cell.outputs)
            for out in cell.outputs:
                if "execution_count" in out:
                    out["execution_count"] = count


def _merged_streams(outputs: list) -> list:
    """Consecutive stdout (or stderr) chunks as one output: how a kernel splits a cell's
    printing depends on timing, so the stored notebook should not."""
    merged: list = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (out.get("output_type") == "stream" and prev is not None
                and prev.get("output_type") == "stream" and prev.get("name") == out.get("name")):
            prev["text"] = "".join(prev["text"]) + "".join(out["text"])
        else:
            merged.append(out)
    return merged


def execute_notebook(path: Path, timeout: int = 900, cwd: Path | None = None) -> float:
    """Execute ``path`` in place (in a fresh kernel, working directory ``cwd`` or its folder),
    clean it and save it. Returns the seconds it took."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    t = time.time()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd or path.parent)}}).execute()
    clean_notebook(nb)
    nbformat.write(nb, path)
    return time.time() - t


def _one_thread_kernels() -> None:
    """Pool initializer: the kernels this worker starts use one thread each (a chapter that
    times several threads sets them itself), so that the workers do not oversubscribe."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


def execute_all(notebooks: List[Path], workers: int | None = None) -> None:
    """Execute ``notebooks`` in place, one kernel per CPU core at a time (at most 4), the
    later (longer, training) chapters first; a progress bar counts finished chapters.
    A failing chapter stops the build with its name and error."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm

    workers = workers or max(1, min(os.cpu_count() or 1, 4, len(notebooks)))
    order = sorted(notebooks, key=lambda p: p.name, reverse=True)
    bar = tqdm(total=len(order), desc=f"executing chapters ({workers} at a time)", unit="chapter")
    with ProcessPoolExecutor(workers, initializer=_one_thread_kernels if workers > 1 else None) as pool:
        futures = {pool.submit(execute_notebook, nb): nb for nb in order}
        for done in as_completed(futures):
            nb = futures[done]
            try:
                seconds = done.result()
            except Exception as err:  # noqa: BLE001 - name the chapter, stop the build
                for f in futures:
                    f.cancel()
                raise RuntimeError(f"{nb.name} failed: {type(err).__name__}: {str(err)[-2000:]}") from None
            bar.set_postfix_str(f"{nb.name} {seconds:.0f} s")
            bar.update(1)
    bar.close()


def chapters(book_dir: Path) -> List[Path]:
    return sorted(p for p in book_dir.glob("*.ipynb"))


def build(execute: bool = False, out: Path | None = None, warnings_as_errors: bool = True,
          toc: Path | None = None) -> Path:
    """Build the site into ``<out>/_build/html`` (``out`` defaults to the repository root);
    with ``execute`` from freshly executed copies. ``toc``: another table of contents
    (e.g. a subset of the chapters while others are being written). Warnings are errors
    unless ``warnings_as_errors=False``. Returns the html folder; raises
    ``RuntimeError`` when jupyter-book fails."""
    src = ROOT
    out = Path(out).resolve() if out is not None else ROOT
    if toc is not None:
        toc = Path(toc).resolve()
        if not toc.is_file():
            raise FileNotFoundError(f"table of contents {toc} does not exist")
    if execute:
        src = ROOT / "_build" / "src"
        if src.exists():
            shutil.rmtree(src)
        src.mkdir(parents=True)
        for name in ("_config.yml", "_toc.yml", "references.bib", "book"):  # book/ has _ext/ too
            p = ROOT / name
            if p.is_dir():
                shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("_build", ".ipynb_checkpoints"))
            elif p.exists():
                shutil.copy(p, src / name)
        wanted = None if toc is None else _toc_files(toc)
        execute_all([nb for nb in chapters(src / "book") if wanted is None or f"book/{nb.stem}" in wanted])
    jb = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(jb) if jb.exists() else "jupyter-book", "build", str(src), "--path-output", str(out)]
    if toc is not None:
        cmd += ["--toc", str(toc)]
    if warnings_as_errors:
        cmd += ["-W", "-n", "--keep-going"]
    env = dict(os.environ, PYDEVD_DISABLE_FILE_VALIDATION="1")
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed (exit {result.returncode}); "
                           f"{'warnings are errors, ' if warnings_as_errors else ''}see its output above")
    html = out / "_build" / "html"
    print(f"site built: {html / 'index.html'}")
    return html


def _toc_files(toc: Path) -> set:
    """Every ``file:`` entry (and the root) of a jb-book table of contents, without suffix."""
    import yaml

    def stem(entry) -> str:
        return re.sub(r"\.(ipynb|md)$", "", str(entry))

    data = yaml.safe_load(toc.read_text())
    found = {stem(data["root"])} if isinstance(data, dict) and "root" in data else set()

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                found.add(stem(node["file"]))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(data)
    return found


def main(argv: Iterable[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python scripts/bookbuild.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("execute", help="execute notebooks in place and clean them")
    e.add_argument("notebooks", nargs="+", type=Path)
    c = sub.add_parser("clean", help="strip execution counts and volatile metadata")
    c.add_argument("notebooks", nargs="+", type=Path)
    b = sub.add_parser("build", help="build the site")
    b.add_argument("--execute", action="store_true", help="execute every chapter first (in a copy)")
    b.add_argument("--out", type=Path, default=None,
                   help="build into OUT/_build/html (default: the repository root)")
    b.add_argument("--toc", type=Path, default=None, help="use another table of contents than _toc.yml")
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.cmd == "execute":
        for nb in args.notebooks:
            print(f"{nb}: {execute_notebook(nb):.1f} s", flush=True)
    elif args.cmd == "clean":
        import nbformat

        for path in args.notebooks:
            nb = nbformat.read(path, as_version=4)
            clean_notebook(nb)
            nbformat.write(nb, path)
    else:
        try:
            build(execute=args.execute, out=args.out, toc=args.toc)
        except (RuntimeError, FileNotFoundError) as err:
            sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
