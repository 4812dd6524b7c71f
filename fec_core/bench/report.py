"""The benchmark's reports (chapter 12): several runs merged into one, the Markdown table
and the plot."""
from __future__ import annotations

import statistics
import sys
from typing import List, Optional

from .settings import PATHS

__all__ = ["merge_reports", "combine_rounds", "to_markdown", "plot"]


def merge_reports(reports: List[dict]) -> dict:
    """Join reports of several runs (say, ``fec_small`` and ``fec_large``, or inference and
    training) into one: ``meta`` of the first run with the device, torch version and
    date, ``meta['runs']`` every run's own ``meta`` (its command among them), and
    all results, each naming its model.

    A setting and path measured in several runs (rounds of ``scripts/cpu_bench.sh``, which
    time every implementation once per round, in turn, so that a machine that slows down
    for a while slows all of them) becomes one row: :func:`combine_rounds`."""
    if not reports:
        raise ValueError("nothing to merge")
    devices = {r["meta"]["device_name"] for r in reports}
    if len(devices) > 1:
        raise ValueError(f"the reports come from different devices: {sorted(devices)}")
    meta = {k: v for k, v in reports[0]["meta"].items() if k not in ("command", "model", "dense", "official",
                                                                      "parameters", "iters", "warmup")}
    meta["runs"] = [r["meta"] for r in reports]
    meta["command"] = " ; ".join(str(r["meta"].get("command")) for r in reports)
    meta["model"] = ", ".join(dict.fromkeys(r["meta"]["model"] for r in reports))
    meta["iters"] = ", ".join(dict.fromkeys(str(r["meta"]["iters"]) for r in reports))
    rows: dict = {}
    for r in reports:
        for row in r["results"]:
            row = dict(row)
            row.setdefault("model", r["meta"]["model"])
            row.setdefault("dense", r["meta"].get("dense", False))
            rows.setdefault(_key(row) + (row["path"],), []).append(row)
    out = dict(meta=meta, results=[combine_rounds(same) for same in rows.values()])
    profiles = [p for r in reports for p in r.get("profiles", [])]
    if profiles:
        out["profiles"] = profiles
    return out


def combine_rounds(rows: List[dict]) -> dict:
    """One row for a setting and path timed in several rounds: the median of the rounds'
    medians (``latency_ms``, ``cpu_ms``; an odd number of rounds gives one of them), the
    fastest iteration of all, the largest peak memory, every round's median in
    ``round_latency_ms`` and every iteration in ``times_ms``. A single row is returned
    as it is; any round that did not run makes the status that round's."""
    if len(rows) == 1:
        return rows[0]
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        return bad[0]
    out = dict(rows[0])
    out["round_latency_ms"] = [r["latency_ms"] for r in rows]
    out["latency_ms"] = statistics.median(out["round_latency_ms"])
    out["latency_ms_min"] = min(r["latency_ms_min"] for r in rows)
    out["throughput"] = out["batch"] / (out["latency_ms"] / 1e3)
    cpu = [r["cpu_ms"] for r in rows if r.get("cpu_ms") is not None]
    out["cpu_ms"] = statistics.median(cpu) if cpu else None
    mems = [r["peak_mem_bytes"] for r in rows if r.get("peak_mem_bytes") is not None]
    out["peak_mem_bytes"] = max(mems) if mems else None
    out["times_ms"] = [t for r in rows for t in r.get("times_ms", [])]
    return out


def _key(r: dict) -> tuple:
    return (r.get("model", ""), r.get("dense", False), r["mode"], r["dtype"], r["batch"], r["resolution"])


def _speedup(results: List[dict], r: dict, reference: str = "literal") -> Optional[float]:
    """Latency of the ``reference`` path over ``r``'s, same model and setting (None if
    either did not run)."""
    for o in results:
        if o["path"] == reference and o["status"] == "ok" and r["status"] == "ok" and _key(o) == _key(r):
            return o["latency_ms"] / r["latency_ms"]
    return None


def to_markdown(report: dict) -> str:
    """The results as a Markdown table (one row per model, path and setting), with each
    path's speedup over the literal path and over the official code of the same setting."""
    meta = report["meta"]
    dense = any(r.get("dense") for r in report["results"]) or meta.get("dense")
    official = any(r["path"] == "official" for r in report["results"])
    lines = [f"Device: {meta['device_name']} ({meta['device']}), model `{meta['model']}`"
             f"{' (dense features)' if dense else ''}, torch {meta['torch']}, "
             f"{meta['iters']} timed iterations, {meta['date']}.", *_rounds_line(report), "",
             "| model | mode | dtype | batch | resolution | path | latency (ms, median) | img/s | CPU time (ms) "
             "| peak memory (MiB) | speedup vs literal |" + (" speedup vs official |" if official else "")
             + " status |",
             "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|" + ("---:|" if official else "") + "---|"]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    def x(v):
        return "" if v is None else f"{v:.2f}x"
    for r in report["results"]:
        mem = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2 ** 20
        name = r.get("model") or meta["model"]
        name += " (dense)" if r.get("dense") else ""
        lines.append(f"| {name} | {r['mode']} | {r['dtype']} | {r['batch']} | {r['resolution']} | {r['path']} | "
                     f"{f(r['latency_ms'], '.1f')} | {f(r['throughput'], '.1f')} | {f(r['cpu_ms'], '.0f')} | "
                     f"{f(mem, '.1f')} | {x(_speedup(report['results'], r))} |"
                     + (f" {x(_speedup(report['results'], r, 'official'))} |" if official else "")
                     + f" {r['status']} |")
    runs = meta.get("runs") or [meta]
    for m in runs:
        if m.get("official"):
            a = m["official"]["agreement"]
            lines.append(f"\nOfficial code ({m['model']}, scatter: {m['official']['scatter']}): same weights; "
                         f"largest output difference to ours {a['max_abs_diff']:.2e} "
                         f"(outputs up to {a['output_scale']:.2e}) at {a['resolution']}x{a['resolution']}.")
    lines.append("")
    lines.append("Command: `" + str(meta.get("command")) + "`")
    return "\n".join(lines) + "\n"


def _rounds_line(report: dict) -> List[str]:
    rounds = {len(r["round_latency_ms"]) for r in report["results"] if r.get("round_latency_ms")}
    if not rounds:
        return []
    return [f"Rows timed in {' or '.join(map(str, sorted(rounds)))} rounds: the median of the rounds' medians."]


def plot(report: dict, path: Optional[str] = None):
    """Bar charts of throughput and peak memory per setting and path, and, when several
    resolutions were measured, peak memory against the number of pixels (log-log)."""
    # imported here, not at the top: a script that only writes the file gets the
    # non-interactive backend, chosen before pyplot loads; where pyplot is already loaded
    # (a notebook), its backend is left alone
    import matplotlib
    if path is not None and "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    paths = [p for p in PATHS if any(r["path"] == p for r in res)]
    paths += sorted({r["path"] for r in res} - set(PATHS))  # timm:<name> yardsticks
    keys = []
    for r in res:
        if _key(r) not in keys:
            keys.append(_key(r))
    several = len({k[0] for k in keys}) > 1  # several models: name them under the bars
    resolutions = sorted({r["resolution"] for r in res})
    ncols = 3 if len(resolutions) > 1 else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4.2))
    width = 0.8 / max(1, len(paths))
    colors = {"official": "tab:red", "literal": "tab:gray", "fast": "tab:blue", "kernel": "tab:cyan",
              "compiled": "tab:green", "compiled_kernel": "darkgreen"}
    others = iter(["tab:purple", "tab:olive", "tab:brown", "tab:pink", "tab:orange"] * 4)
    colors.update({p: next(others) for p in paths if p not in colors})  # yardsticks
    for ax, field_, label in ((axes[0], "throughput", "images / s"), (axes[1], "peak_mem_bytes", "peak memory (MiB)")):
        for j, p in enumerate(paths):
            vals = []
            for k in keys:
                v = next((r[field_] for r in res if r["path"] == p and _key(r) == k), None)
                if v is not None and field_ == "peak_mem_bytes":
                    v = v / 2 ** 20
                vals.append(float("nan") if v is None else v)
            ax.bar([i + (j - (len(paths) - 1) / 2) * width for i in range(len(keys))], vals, width,
                   label=p, color=colors[p])
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([(f"{name}\n" if several else "") + f"{m} {d}\nb{b} {r}px"
                            for name, _, m, d, b, r in keys], fontsize=7)
        ax.set_ylabel(label)
        ax.legend()
    axes[0].set_title("throughput (higher is better)")
    axes[1].set_title("peak memory (lower is better)")
    if ncols == 3:
        ax = axes[2]
        styles = {"infer": "o-", "train": "s--"}
        reference = None
        for p in paths:
            for (name, m, d, b) in sorted({(r.get("model", ""), r["mode"], r["dtype"], r["batch"]) for r in res}):
                pts = sorted((r["resolution"] ** 2, r["peak_mem_bytes"] / 2 ** 20) for r in res
                             if r["path"] == p and (r.get("model", ""), r["mode"], r["dtype"], r["batch"])
                             == (name, m, d, b) and r["peak_mem_bytes"])
                if len(pts) > 1:
                    ax.loglog(*zip(*pts), styles[m], color=colors[p], label=f"{name} {p} {m} {d} b{b}")
                    ours_fast = p in ("fast", "kernel", "compiled", "compiled_kernel")
                    if reference is None or (ours_fast and reference[0] in ("literal", "official")):
                        reference = (p, pts)
        if reference is not None:
            pts = reference[1]
            xs = [pts[0][0], pts[-1][0]]
            ax.loglog(xs, [pts[0][1], pts[0][1] * xs[1] / xs[0]], "k:", label="linear in pixels")
        ax.set_xlabel("pixels per image")
        ax.set_ylabel("peak memory (MiB)")
        ax.set_title("memory against input size")
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['meta']['model']} on {report['meta']['device_name']}", fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig
