#!/usr/bin/env python3
"""Measure the spread of every training number the book asserts on, across CPU code paths
and seeds (the portability contract: chapters assert margins, not last bits).

    python scripts/measure_spread.py --seeds 0 1 2 --out spread.json

Each (configuration, seed) runs in its own process, because the CPU configuration
(``MKL_CBWR``, ``ATEN_CPU_CAPABILITY``) must be set before torch is imported. Configurations:
``native`` (this machine's default), ``compat`` (MKL_CBWR=COMPATIBLE, ATEN_CPU_CAPABILITY=default),
``threads2`` (native kernels, two threads instead of the chapters' one). The numbers are those
of chapters 10 (digits), 11 (emergent segmentation) and 13 (Semantic FPN on shapes), computed
with the chapters' recipes; only the seed changes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONFIGS = {
    "native": {},
    "compat": {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default"},
    "threads2": {"FEC_SPREAD_THREADS": "2"},
}


def measure(seed: int) -> dict:
    """One seed in this process: the asserted quantities of chapters 10, 11 and 13."""
    import numpy as np
    import torch

    import fec_core
    from fec_core import foreground as fg
    from fec_core.data import SHAPE_CLASSES, TensorImageDataset, make_shapes
    from fec_core.seg import SEG_RECIPE, shapes_segmentation, train_segmentation
    from fec_core.train import MeanIoU, TrainConfig, evaluate, fit

    threads = int(os.environ.get("FEC_SPREAD_THREADS", "1"))
    out = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": threads}
    t = time.time()
    # chapter 10: fec_tiny on digits, against logistic regression (0.969)
    r = fit(TrainConfig(dataset="digits", threads=threads, seed=seed), progress=False)
    out["ch10_digits_last_acc"] = r.history[-1]["val_acc"]
    out["ch10_digits_best_acc"] = r.best_metric
    # chapter 11: texture shapes, emergent segmentation
    x_all, y_all, m_all = make_shapes(2300, 64, seed=0, contrast="texture")
    tr = TensorImageDataset(x_all[:2000], y_all[:2000], SHAPE_CLASSES)
    va = TensorImageDataset(x_all[2000:], y_all[2000:], SHAPE_CLASSES)
    cfg = TrainConfig(dataset="shapes", model="fec_tiny", epochs=8, threads=threads, seed=seed)
    trained = fit(cfg, train_set=tr, val_set=va, progress=False)
    out["ch11_val_acc"] = trained.history[-1]["val_acc"]
    trained = trained.model.eval()
    torch.manual_seed(seed)
    untrained = fec_core.create_model("fec_tiny", num_classes=4).eval()
    x_test, _, m_test = make_shapes(300, 64, seed=1000, contrast="texture")
    m_val = m_all[2000:]
    val_iou = {s: float(fg.foreground_iou(fg.segment_foreground(trained, x_all[2000:], stage=s), m_val).mean())
               for s in range(4)}
    best = max(val_iou, key=val_iou.get)
    test = {s: float(fg.foreground_iou(fg.segment_foreground(trained, x_test, stage=s), m_test).mean())
            for s in range(4)}
    unt = max(float(fg.foreground_iou(fg.segment_foreground(untrained, x_test, stage=s), m_test).mean())
              for s in range(4))
    pix = max(float(fg.foreground_iou(fg.kmeans_foreground(x_test, xy_weight=w), m_test).mean())
              for w in (0.5, 0.0, 1.0))
    out.update(ch11_best_stage=best, ch11_headline=test[best], ch11_stage0=test[0], ch11_stage1=test[1],
               ch11_untrained_best=unt, ch11_pixels_best=pix,
               ch11_by_k={k: float(fg.foreground_iou(fg.segment_foreground(trained, x_test, stage=best, k=k),
                                                      m_test).mean()) for k in (2, 3, 4)})
    # chapter 13: Semantic FPN on shapes
    r = train_segmentation(progress=False, seed=seed, threads=threads)
    model = r.model.eval()
    _, val_set = shapes_segmentation(SEG_RECIPE["train_samples"], SEG_RECIPE["val_samples"],
                                     SEG_RECIPE["img_size"], seed=seed)
    images = torch.stack([x for x, _ in val_set])
    targets = torch.stack([t for _, t in val_set])
    with torch.no_grad():
        pred = model(images).argmax(1)
    fg = ((pred > 0) & (targets > 0)).sum().item() / ((pred > 0) | (targets > 0)).sum().item()
    majority = [torch.mode(p[p > 0]).values.item() if (p > 0).any() else 0 for p in pred]
    truth = [t[t > 0][0].item() for t in targets]
    out.update(ch13_miou_last=r.history[-1]["val_miou"], ch13_best_epoch=r.best_epoch, ch13_fg_iou=fg,
               ch13_recognized=float(np.mean([m == t for m, t in zip(majority, truth)])))
    out["seconds"] = time.time() - t
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--out", default="spread.json")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one seed, print JSON
    args = p.parse_args()
    if args.one is not None:
        print("RESULT " + json.dumps(measure(args.one)), flush=True)
        return 0
    results = []
    for cfg in args.configs:
        for seed in args.seeds:
            env = dict(os.environ, OMP_NUM_THREADS="2", **CONFIGS[cfg])
            proc = subprocess.run([sys.executable, __file__, "--one", str(seed)], env=env, capture_output=True,
                                  text=True)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{cfg} seed {seed} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            res = dict(config=cfg, seed=seed, **json.loads(line[0][7:]))
            results.append(res)
            print(json.dumps(res), flush=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
