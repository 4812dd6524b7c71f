"""Benchmark: the literal clustering path against the fast path, side by side (chapter 12).

``python -m fec_core.bench`` (or ``fec-bench``) builds one model, then for every
combination of mode (inference, training step), dtype (float32, bfloat16 autocast),
batch size and resolution times the literal path and the fast path in the same
process, alternating their iterations so that both see the same machine load. It
reports per path: latency (median and best of ``--iters``), throughput in images
per second, CPU time per step and peak memory, and writes ``bench.json``,
``bench.md`` (a Markdown table) and ``bench.png`` (a plot) to ``--out-dir``. It prints
the device name first.

Our paths (``--paths``): ``literal`` (the equations with dense masks and products),
``fast`` (the fast path in PyTorch ops only), ``kernel`` (the fast path with the Triton
kernels of :mod:`fec_core.kernels`, the library's default on CUDA), and ``compiled`` /
``compiled_kernel`` (the same two under ``torch.compile``). Each runs in its kernel mode
(:data:`~fec_core.bench.settings.PATH_KERNEL_MODE`); where the kernels cannot run (a CPU
outside Triton's interpreter) the kernel paths are reported as skipped.

Peak memory is measured in one extra step per path: on CUDA with
``torch.cuda.max_memory_allocated`` (absolute: weights, input and activations), on
CPU from the allocation events of PyTorch's CPU allocator recorded by
``torch.profiler`` (bytes allocated above the level before the step). A training
step is forward, cross-entropy on random labels, backward and an SGD step.

On a machine shared with other programs, multi-threaded CPU timings are erratic
because OpenMP threads spin while they wait for each other; run with
``OMP_WAIT_POLICY=PASSIVE`` (it must be set before Python starts) or ``--threads 1``.

With ``--official FILE`` (a copy of the official ``models/fec.py``, github
guikunchen/FEC) the official model is built too and timed in the same process as
path ``official``, next to ours: our model is loaded with the official model's
weights (through :func:`fec_core.checkpoint_filter_fn`), and the tables give each
path's speedup over the official code. If ``torch_scatter`` is not installed, the
official file's ``scatter_sum`` is served by an ``index_add_`` stand-in (the same sum,
see :func:`load_official`). ``--merge A.json B.json`` joins reports of several runs
into one (one row per model, path and setting) and ``--profile`` writes the top
kernels of one step per path (``torch.profiler``) to ``profile.txt``.

Examples::

    python -m fec_core.bench                                   # CPU: fec_small, batch 8, 224x224, fp32
    python -m fec_core.bench --device cuda --batch-sizes 64 128 256 --dtypes fp32 bf16
    python -m fec_core.bench --device cuda --paths fast kernel compiled compiled_kernel --dtypes bf16
    python -m fec_core.bench --device cuda --dense --batch-sizes 1 --resolutions 512 1024 2048 \\
        --modes infer --paths fast                             # memory against pixels
    python -m fec_core.bench --model fec_tiny --batch-sizes 2 --resolutions 64 --iters 2
    python -m fec_core.bench --device cuda --official official_fec.py --paths official fast \
        --model fec_large --batch-sizes 256 --modes infer --dtypes fp32 bf16
    python -m fec_core.bench --merge run1/bench.json run2/bench.json --out-dir all

The parts: :mod:`~fec_core.bench.settings` (what to measure, checked first),
:mod:`~fec_core.bench.measure` (one step: time, memory, profile),
:mod:`~fec_core.bench.official` (the official code, same weights), :mod:`~fec_core.bench.runner`
(the main loop), :mod:`~fec_core.bench.report` (merge, table, plot) and
:mod:`~fec_core.bench.cli`. Every public name is importable from ``fec_core.bench``.
"""
from .cli import main, run_cli
from .measure import (device_name, is_oom, literal_tensor_bytes, measure_memory, peak_cpu_bytes, profile_table,
                      quiet_native_stderr, step_fn, synchronize)
from .official import agreement, build_official, load_official
from .report import combine_rounds, merge_reports, plot, to_markdown
from .runner import run
from .settings import (DTYPES, KERNEL_PATHS, MODES, PATH_KERNEL_MODE, PATHS, BenchConfig, Result, check_config,
                       kernels_available)

__all__ = ["BenchConfig", "Result", "run", "run_cli", "device_name", "peak_cpu_bytes", "literal_tensor_bytes",
           "quiet_native_stderr", "synchronize", "step_fn", "measure_memory", "profile_table", "is_oom",
           "load_official", "build_official", "agreement", "merge_reports", "combine_rounds", "to_markdown", "plot",
           "main", "kernels_available", "PATHS", "PATH_KERNEL_MODE", "KERNEL_PATHS", "MODES", "DTYPES",
           "check_config"]
