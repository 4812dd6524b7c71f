"""Memory traffic of FEC's steps with and without the fused Triton kernels (chapter 12,
issue 24): every PyTorch operator, views excluded, counted as reading its inputs and writing
its outputs once (on a GPU, tensors of this size do not stay in cache, so this is what
an unfused step moves through memory; a fused kernel counts as one operator).

    TRITON_INTERPRET=1 python scripts/encode_traffic.py            # one encode step
    TRITON_INTERPRET=1 python scripts/encode_traffic.py --model    # + fec_small, per image

The encode step is fec_small's first stage at 224 px (24 key and value channels per head,
4 x 4 centers, 56 x 56 points) under bfloat16 autocast, with float32 alpha and beta as in
the model; printed per point and head. ``--model`` counts a whole fec_small forward (and a
training step with ``--train``) per image. The kernels run in Triton's interpreter on a
CPU (the same operators a GPU runs, slowly); without it only the PyTorch rows are printed.
"""
from __future__ import annotations

import argparse
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fec_core  # noqa: F401  (registers the models)
import fec_core.clustering as cl
from fec_core import config, kernels

VIEWS = {"view", "_unsafe_view", "transpose", "t", "expand", "permute", "unsqueeze", "squeeze", "as_strided",
         "slice", "select", "alias", "detach", "_reshape_alias", "reshape", "flatten", "lift_fresh", "unbind"}


def _nbytes(t) -> int:
    if not isinstance(t, torch.Tensor):
        return 0
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())  # an expanded view: its storage


class Traffic(TorchDispatchMode):
    """Counts operators and the bytes they read and write, per operator name."""

    def __init__(self):
        super().__init__()
        self.ops, self.bytes = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name.rstrip("_") in VIEWS:
            return out
        inputs = tree_leaves((args, kwargs))
        if name.startswith("new_") or name.endswith("_like") or name in ("zeros", "empty", "ones"):
            inputs = []  # a tensor for its type and device only
        elif name == "avg_pool2d_backward":
            inputs = inputs[:1]  # the forward's input: for its shape only
        self.ops[name] += 1
        self.bytes[name] += sum(map(_nbytes, inputs)) + sum(map(_nbytes, tree_leaves(out)))
        return out


def encode_step(mode: str, train: bool):
    config.set_kernel_mode(mode)
    torch.manual_seed(0)
    b, c, side = 8, 24, 56  # 2 images x 4 heads
    k = torch.randn(b, c, side, side, dtype=torch.bfloat16, requires_grad=train)
    v = torch.randn(b, c, side, side, dtype=torch.bfloat16, requires_grad=train)
    alpha, beta = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.zeros(1))
    fwd, bwd = Traffic(), Traffic()
    with torch.autocast("cpu", dtype=torch.bfloat16), fwd:
        out, _ = cl.cluster_encode(k, v, alpha, beta, (4, 4))
    if train:
        grad = torch.randn(out.shape)
        with bwd:
            out.backward(grad)
    return fwd, bwd, b * side * side


def model_step(mode: str, train: bool, batch: int = 2):
    import timm
    config.set_kernel_mode(mode)
    torch.manual_seed(0)
    m = timm.create_model("fec_small").train(train)
    x = torch.randn(batch, 3, 224, 224)
    count = Traffic()
    with count, torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(train):
        out = m(x)
        if train:
            out.float().logsumexp(-1).sum().backward()
    return count, batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="store_true", help="also a whole fec_small, per image")
    p.add_argument("--train", action="store_true", help="with --model: a training step too (slow)")
    p.add_argument("--top", type=int, default=0, help="print the N largest operators of each row")
    args = p.parse_args()
    modes = ["off"] + (["on"] if kernels.HAS_TRITON and kernels.INTERPRET else [])
    print("one encode step (fec_small stage 0, bf16 autocast), per point and head:")
    for mode in modes:
        for train in (False, True):
            fwd, bwd, points = encode_step(mode, train)
            what = "forward + backward" if train else "forward"
            total = (sum(fwd.bytes.values()) + sum(bwd.bytes.values())) / points
            print(f"  kernels {mode:3s} {what:18s} {sum(fwd.ops.values()):3d} + {sum(bwd.ops.values()):3d} operators, "
                  f"{sum(fwd.bytes.values()) / points:6.0f} + {sum(bwd.bytes.values()) / points:6.0f} = "
                  f"{total:6.0f} bytes")
            for name, n in (fwd.bytes + bwd.bytes).most_common(args.top):
                print(f"      {name:28s} {n / points:8.1f} bytes")
    if not args.model:
        return
    print("fec_small at 224 px (bf16 autocast), batch 2:")
    for train in (False, True) if args.train else (False,):
        for mode in modes:
            count, batch = model_step(mode, train)
            total = sum(count.bytes.values()) / batch
            print(f"  kernels {mode:3s} {'training step' if train else 'inference':13s} "
                  f"{sum(count.ops.values()):5d} operators per step, {total / 2 ** 20:7.1f} MiB per image")
            for name, n in count.bytes.most_common(args.top):
                print(f"      {name:28s} {n / batch / 2 ** 20:8.2f} MiB")


if __name__ == "__main__":
    main()
