"""Execute, clean and build the book's notebooks (a tool of this repository, not of fec_core).

    python scripts/bookbuild.py execute book/03_centers.ipynb   # run in place, store clean outputs
    python scripts/bookbuild.py execute --jobs 2 book/*.ipynb    # every chapter, two at a time
    python scripts/bookbuild.py clean book/*.ipynb               # strip execution counts / volatile metadata
    python scripts/bookbuild.py build [--execute]                 # build the site (stored or fresh outputs)
    python scripts/bookbuild.py build --out /tmp/site --toc /tmp/toc.yml   # elsewhere, other chapters
    python scripts/bookbuild.py pin                                # Colab install cells -> this version

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


def execute_notebook(path: Path, timeout: int = 900, cwd: Path | None = None,
                     progress=None, save_failed: bool = False) -> dict:
    """Execute ``path`` in place (a fresh kernel, working directory ``cwd`` or its folder),
    clean it and save it. ``progress``: a queue that receives the chapter's name after
    every executed code cell. A chapter that fails is left as it was, unless
    ``save_failed`` (the site build's copies).

    Returns ``{"seconds": ..., "failure": None}``, or with ``failure`` a dict naming the
    failing cell (``cell``: its number among the code cells, ``line``: its first line,
    ``error``: the exception's last line). With ``save_failed`` a failed chapter is saved
    as far as it ran, with the error output in its cell, the later cells' outputs removed
    and a note at the top, so that its page on the site says what failed.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    failed = {}

    def on_error(cell, cell_index, execute_reply):
        content = execute_reply["content"]
        failed.update(index=cell_index, error=f"{content.get('ename')}: {content.get('evalue')}")

    def on_done(**_):
        if progress is not None:
            progress.put(path.name)

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd or path.parent)}},
                            on_cell_error=on_error, on_cell_executed=on_done)
    t = time.time()
    try:
        client.execute()
    except CellExecutionError:
        pass  # recorded by on_error
    except Exception as err:  # noqa: BLE001 - a timeout or a dead kernel fails the chapter too
        failed.setdefault("index", _running_cell(nb))
        failed.setdefault("error", f"{type(err).__name__}: {str(err).strip().splitlines()[-1:]}")
    failure = _mark_failure(nb, failed) if failed else None
    if failure is None or save_failed:
        clean_notebook(nb)
        nbformat.write(nb, path)
    return {"seconds": time.time() - t, "failure": failure}


def _running_cell(nb) -> int:
    """Index of the last code cell that has outputs or an execution count (where a timeout
    or a dead kernel stopped the run), 0 if none."""
    ran = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.get("outputs")]
    return ran[-1] if ran else 0


def _mark_failure(nb, failed: dict) -> dict:
    """Remove the outputs after the failing cell, put a note at the top; return the failure."""
    import nbformat

    index = failed["index"]
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    number = code.index(index) + 1 if index in code else 0
    first = nb.cells[index].source.strip().splitlines()[:1] if index < len(nb.cells) else []
    for cell in nb.cells[index + 1:]:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    error = failed["error"].strip().splitlines()[-1] if failed["error"].strip() else "error"
    note = nbformat.v4.new_markdown_cell(
        f":::{{warning}}\nThis chapter stopped at code cell {number} when it was executed for "
        f"this build: `{error}`. The outputs below that cell are missing.\n:::")
    title = 1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0
    nb.cells.insert(title, note)
    return {"cell": number, "line": first[0] if first else "", "error": error}


def _one_thread_kernels() -> None:
    """Pool initializer: the kernels this worker starts use one thread each (a chapter that
    times several threads sets them itself), so that the workers do not oversubscribe."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


def execute_all(notebooks: List[Path], workers: int | None = None,
                save_failed: bool = True) -> List[str]:
    """Execute ``notebooks`` in place, one kernel per CPU core at a time (at most 4), the
    later (longer, training) chapters first (``save_failed``: see :func:`execute_notebook`). A progress bar counts executed code cells of
    all chapters, so it moves while the long chapters run; a line is printed as each
    chapter finishes. A failing chapter does not stop the others: returns one line per
    failed chapter (chapter, cell, error), empty when all ran."""
    import multiprocessing
    import queue
    from concurrent.futures import ProcessPoolExecutor

    import nbformat
    from tqdm.auto import tqdm

    workers = workers or max(1, min(os.cpu_count() or 1, 4, len(notebooks)))
    order = sorted(notebooks, key=lambda p: p.name, reverse=True)
    cells = sum(sum(c.cell_type == "code" for c in nbformat.read(p, as_version=4).cells)
                for p in order)
    failures: List[str] = []
    bar = tqdm(total=cells, unit="cell", dynamic_ncols=True,
               desc=f"executing {len(order)} chapters ({workers} at a time)")
    with multiprocessing.Manager() as manager, ProcessPoolExecutor(
            workers, initializer=_one_thread_kernels if workers > 1 else None) as pool:
        progress = manager.Queue()
        pending = {pool.submit(execute_notebook, nb, progress=progress,
                               save_failed=save_failed): nb for nb in order}
        finished = 0
        while pending:
            try:
                progress.get(timeout=1.0)
                bar.update(1)
                continue
            except queue.Empty:
                pass
            for future in [f for f in pending if f.done()]:
                nb = pending.pop(future)
                finished += 1
                try:
                    result = future.result()
                except Exception as err:  # noqa: BLE001 - the worker itself broke
                    result = {"seconds": 0, "failure": {"cell": 0, "line": "",
                                                        "error": f"{type(err).__name__}: {err}"}}
                failure = result["failure"]
                status = "ok" if failure is None else f"FAILED at code cell {failure['cell']}"
                bar.write(f"[{finished}/{len(order)}] {nb.name}: {status} "
                          f"({result['seconds']:.0f} s)")
                if failure is not None:
                    failures.append(f"{nb.name}, code cell {failure['cell']} "
                                    f"({failure['line'][:60]}): {failure['error'][:300]}")
            bar.set_postfix_str(f"{finished}/{len(order)} chapters done")
    bar.close()
    return failures


#: The Colab install cell names the release once: ``release = "git+<url>.git@v<version>"``,
#: then ``%pip install -q "fec-core @ {release}"`` (IPython expands ``{release}``).
RELEASE_LINE = re.compile(r'(release = "git\+)[^"]*(")')


def release() -> tuple:
    """``(repository url, version)``: the repository from ``_config.yml``, the version from
    ``pyproject.toml``. A release of the book is the git tag ``v<version>``, and every
    chapter's Colab install cell installs exactly that tag."""
    import yaml

    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    return url, version


def pin(notebooks: Iterable[Path]) -> None:
    """Point every chapter's Colab install line at ``<repository>.git@v<version>``."""
    import nbformat

    url, version = release()
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        cell = next(c for c in nb.cells if c.cell_type == "code")
        new = RELEASE_LINE.sub(lambda m: f"{m.group(1)}{url}.git@v{version}{m.group(2)}", cell.source)
        if new != cell.source:
            cell.source = new
            nbformat.write(nb, path)
            print(f"{path.name}: installs v{version}")


def chapters(book_dir: Path) -> List[Path]:
    return sorted(p for p in book_dir.glob("*.ipynb"))


def build(execute: bool = False, out: Path | None = None, warnings_as_errors: bool = True,
          toc: Path | None = None) -> Path:
    """Build the site into ``<out>/_build/html`` (``out`` defaults to the repository root);
    with ``execute`` from freshly executed copies. ``toc``: another table of contents
    (e.g. a subset of the chapters while others are being written). Warnings are errors
    unless ``warnings_as_errors=False``. Returns the html folder; raises
    ``RuntimeError`` after building the site when a chapter failed to execute (naming
    each: chapter, cell, error) or jupyter-book failed (both named when both happened)."""
    src = ROOT
    failures: List[str] = []
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
        failures = execute_all([nb for nb in chapters(src / "book")
                                if wanted is None or f"book/{nb.stem}" in wanted])
    jb = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(jb) if jb.exists() else "jupyter-book", "build", str(src), "--path-output", str(out)]
    if toc is not None:
        cmd += ["--toc", str(toc)]
    if warnings_as_errors:
        cmd += ["-W", "-n", "--keep-going"]
    env = dict(os.environ, PYDEVD_DISABLE_FILE_VALIDATION="1")
    result = subprocess.run(cmd, env=env)
    html = out / "_build" / "html"
    problems = []
    if failures:  # named first: a failed chapter's missing glue keys also fail the site's -W
        problems.append(f"{len(failures)} chapter(s) failed (their pages show the failing "
                        "cell; the others were built):\n  " + "\n  ".join(failures))
    if result.returncode != 0:
        problems.append(f"jupyter-book build failed (exit {result.returncode}); "
                        f"{'warnings are errors, ' if warnings_as_errors else ''}"
                        "see its output above")
    elif html.is_dir():
        print(f"site built: {html / 'index.html'}")
    if problems:
        raise RuntimeError("\n".join(problems))
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
    e.add_argument("--jobs", type=int, default=1,
                   help="chapters executed side by side (one thread each); a failed one is left as it was")
    c = sub.add_parser("clean", help="strip execution counts and volatile metadata")
    c.add_argument("notebooks", nargs="+", type=Path)
    b = sub.add_parser("build", help="build the site")
    b.add_argument("--execute", action="store_true", help="execute every chapter first (in a copy)")
    b.add_argument("--out", type=Path, default=None,
                   help="build into OUT/_build/html (default: the repository root)")
    b.add_argument("--toc", type=Path, default=None, help="use another table of contents than _toc.yml")
    sub.add_parser("pin", help="point the chapters' Colab install cells at this version's tag")
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.cmd == "execute" and args.jobs > 1:
        failures = execute_all(args.notebooks, workers=args.jobs, save_failed=False)
        if failures:
            sys.exit("failed (left as they were):\n  " + "\n  ".join(failures))
    elif args.cmd == "execute":
        failed = False
        for nb in args.notebooks:
            result = execute_notebook(nb)
            failure = result["failure"]
            failed |= failure is not None
            print(f"{nb}: {result['seconds']:.1f} s" + ("" if failure is None else
                  f", FAILED at code cell {failure['cell']} ({failure['line'][:60]}): "
                  f"{failure['error']} (the file is left as it was)"), flush=True)
        if failed:
            sys.exit(1)
    elif args.cmd == "pin":
        pin(chapters(ROOT / "book"))
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
