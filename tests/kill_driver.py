"""Kill a training run right before or right after each of its file writes, resume it, and
check that its files end as an uninterrupted run's (used by test_reliability.py). The files
are read back with ``weights_only=True``: a run's checkpoints hold plain types only.

Run as ``python kill_driver.py WORKDIR [fresh|resumed]``; prints one JSON line per kill
point. Every run is a forked child that sends itself SIGKILL (a real kill: no cleanup, no
``finally``) when ``os.replace`` is called for the k-th time, before or after the rename.
"""
import json
import os
import shutil
import signal
import sys
import traceback

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import shapes_sets, tiny_cfg, tiny_fec  # noqa: E402

from fec_core.train import Metric, fit  # noqa: E402

EPOCHS = 3
SCORES = {1: 0.5, 2: 0.7, 3: 0.6}  # epoch 2 improves on epoch 1, epoch 3 does not
TIMING = ("images_per_s", "epoch_time_s")


class Scripted(Metric):
    """A validation score fixed per epoch, so that which epochs write best.pt is known."""

    name = "score"

    def __init__(self, first_epoch):
        self.first_epoch, self.resets = first_epoch, 0
        super().__init__()

    def reset(self):  # fit resets it once before each epoch's validation
        self.resets += 1
        self.state = {}

    def update(self, output, target):
        pass

    def compute(self):
        return {"score": SCORES[self.first_epoch + self.resets - 2]}


def run(out, data, kill=None):
    """Train (resuming if ``out`` holds latest.pt) in a forked child; returns the wait status."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if kill is not None:
                k, phase = kill
                calls, real = [0], os.replace

                def replace(src, dst):
                    calls[0] += 1
                    if calls[0] == k and phase == "before":
                        os.kill(os.getpid(), signal.SIGKILL)
                    real(src, dst)
                    if calls[0] == k and phase == "after":
                        os.kill(os.getpid(), signal.SIGKILL)
                os.replace = replace
            latest = os.path.join(out, "latest.pt")
            resume = out if os.path.exists(latest) else None
            first = torch.load(latest, weights_only=True)["epoch"] + 1 if resume else 1
            fit(tiny_cfg(out, epochs=EPOCHS, batch_size=8, resume=resume), model=tiny_fec(), train_set=data[0],
                val_set=data[1], metric=Scripted(first), progress=False)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def summary(out):
    """Everything that must match an uninterrupted run (timings and paths left out)."""
    def ckpt(name):
        c = torch.load(os.path.join(out, name), weights_only=True)
        hist = [{k: v for k, v in h.items() if k not in TIMING} for h in c["history"]]
        return c["epoch"], c["best_epoch"], c["best_metric"], hist, c["model"]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        log = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]
    with open(os.path.join(out, "config.json")) as f:
        config = {k: v for k, v in json.load(f).items() if k not in ("output_dir", "resume")}
    leftovers = sorted(n for n in os.listdir(out) if n.endswith(".tmp"))
    tensors = load_file(os.path.join(out, "best.safetensors"))
    return ckpt("latest.pt"), ckpt("best.pt"), log, config, leftovers, tensors


def same(a, b):
    (la, ba, loga, ca, ta, sa), (lb, bb, logb, cb, tb, sb) = a, b
    def ck(x, y):
        return x[:4] == y[:4] and x[4].keys() == y[4].keys() and all(torch.equal(x[4][k], y[4][k]) for k in x[4])
    problems = []
    if not ck(la, lb):
        problems.append(f"latest.pt differs (epoch {la[0]} vs {lb[0]}, best_epoch {la[1]} vs {lb[1]})")
    if not ck(ba, bb):
        problems.append(f"best.pt differs (epoch {ba[0]} vs {bb[0]})")
    if loga != logb:
        problems.append(f"metrics.jsonl differs ({[h['epoch'] for h in loga]})")
    if ca != cb:
        problems.append("config.json differs")
    if ta:
        problems.append(f"left over: {ta}")
    if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
        problems.append("best.safetensors differs")
    return problems


def main(work, scenario):
    torch.set_num_threads(1)
    data = shapes_sets(16, 8)
    ref = os.path.join(work, "reference")
    assert run(ref, data) == 0
    expected = summary(ref)
    base = None
    if scenario == "resumed":  # kills during a resumed run: start from a run killed after epoch 1
        base = os.path.join(work, "base")
        assert os.WIFSIGNALED(run(base, data, (4, "after")))  # config, latest, best, metrics: epoch 1 done
        assert torch.load(os.path.join(base, "latest.pt"), weights_only=True)["epoch"] == 1
    for phase in ("before", "after"):
        for k in range(1, 50):
            out = os.path.join(work, f"{phase}{k}")
            if base is not None:
                shutil.copytree(base, out)
            status = run(out, data, (k, phase))
            if os.WIFEXITED(status):  # fewer than k writes: the run finished
                assert os.WEXITSTATUS(status) == 0, f"run failed at kill point {k} {phase}"
                break
            assert os.WTERMSIG(status) == signal.SIGKILL
            state = sorted(os.listdir(out))
            assert run(out, data) == 0, f"resume after a kill {phase} write {k} failed"
            print(json.dumps({"write": k, "phase": phase, "after_kill": state, "problems": same(summary(out),
                                                                                               expected)}))
            shutil.rmtree(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "fresh")
