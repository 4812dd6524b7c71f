"""The assignments of a forward pass (book chapters 5, 8 and 11): which center every point of
every clustering layer joined, as :class:`ClusterRecord` s.

Where this concern lives, and why:

* a clustering layer keeps its last assignment itself while recording is on
  (:class:`AssignmentRecorder`, the mixin of :class:`~fec_core.layers.ClusterEncode` and
  :class:`~fec_core.layers.ClusterPool`): the assignment is not an output of the layer, so
  no forward hook can see it, and only the layer knows its heads and fold regions;
* the backbone runs the pass, :meth:`fec_core.FEC.forward_with_clusters`, as
  :meth:`~fec_core.FEC.forward_intermediates` returns the stage outputs: the model is what
  a user holds, and its forward is the one to record;
* everything else is here and nowhere else: the record type, the switch (:func:`recording`),
  gathering the records (:func:`collect_records`), and the module names that label them
  (:func:`stage_and_block`, :func:`official_name`), which :mod:`fec_core.interpret` and the
  parity tests read without depending on the backbone.

Recording is off unless :func:`recording` switches it on, and a layer stores nothing then
(scripted, traced, compiled and exported models run with it off). No ``from __future__
import annotations`` here: TorchScript reads the mixin's attribute annotations.
"""
import contextlib
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["ClusterRecord", "AssignmentRecorder", "recording", "collect_records", "stage_and_block",
           "official_name"]


@dataclass
class ClusterRecord:
    """The assignment map of one clustering layer from one forward pass.

    ``index``: for ``kind == 'encode'`` a LongTensor ``[B, heads, fold_w, fold_h, w, h]``;
    for ``kind == 'pool'`` ``[B, fold_w, fold_h, w, h]``. ``(w, h)`` is the size of one fold
    region of the layer's input feature map (rows, columns); the value is the index
    of the winning center inside its region, row-major over the region's center grid
    ``proposal`` (the layer's ``proposal`` for encode layers, ``(w/2, h/2)`` for pooling).
    """

    name: str
    official_name: str
    kind: str
    stage: int
    index: torch.Tensor
    fold: Tuple[int, int]
    proposal: Tuple[int, int]

    @property
    def num_centers(self) -> int:
        return self.proposal[0] * self.proposal[1]


class AssignmentRecorder:
    """Mixin: a clustering layer that keeps its last assignment map while ``record`` is set.

    ``name`` and ``official_name`` (:func:`official_name`) label its records; ``stage`` is
    the stage it belongs to (:func:`stage_and_block`); the model sets all three."""

    name: str = ""
    official_name: str = ""
    record: bool = False
    last_index: Optional[torch.Tensor] = None

    @torch.jit.unused
    def keep_assignment(self, index: torch.Tensor, shape: List[int]) -> None:
        """Keep ``index`` (reshaped to ``shape``) as ``last_index`` while recording."""
        if self.record:
            self.last_index = index.detach().reshape(shape)


@contextlib.contextmanager
def recording(layers: Sequence[nn.Module]) -> Iterator[Sequence[nn.Module]]:
    """Context in which the clustering ``layers`` keep their last assignment map (cleared on
    entry, recording switched off on exit); yields ``layers``."""
    for m in layers:
        m.record, m.last_index = True, None
    try:
        yield layers
    finally:
        for m in layers:
            m.record = False


def collect_records(layers: Sequence[nn.Module]) -> List[ClusterRecord]:
    """The :class:`ClusterRecord` s of ``layers`` after a recorded forward pass, in their order
    (layers that did not run, e.g. pruned ones, give none); their kept maps are released."""
    records = []
    for m in layers:
        if m.last_index is None:
            continue
        idx = m.last_index
        proposal = m.proposal if m.kind == "encode" else (idx.shape[-2] // 2, idx.shape[-1] // 2)
        records.append(ClusterRecord(m.name, m.official_name, m.kind, m.stage, idx, m.fold, proposal))
        m.last_index = None
    return records


def stage_and_block(name: str) -> Tuple[int, Optional[int]]:
    """Where a module of :class:`~fec_core.FEC` sits, from its name: ``stages.i.blocks.k...`` ->
    ``(i, k)``, ``stages.i.downsample...`` (stage ``i``'s pooling layer) -> ``(i, None)``,
    anything else (the stem, the head) -> ``(0, None)``."""
    parts = name.split(".")
    if parts[0] != "stages" or len(parts) < 2:
        return 0, None
    block = int(parts[3]) if len(parts) > 3 and parts[2] == "blocks" else None
    return int(parts[1]), block


def official_name(name: str) -> str:
    """Our module name -> the official one: ``stages.i.blocks.k`` -> ``network.{2i}.k``,
    ``stages.i.downsample`` -> ``network.{2i-1}``, ``stem`` -> ``patch_embed``, ``out_norms.i`` -> ``norm{2i}``."""
    parts = name.split(".")
    if parts[0] == "stem":
        return ".".join(["patch_embed"] + parts[1:])
    if parts[0] == "out_norms":
        return ".".join([f"norm{2 * int(parts[1])}"] + parts[2:])
    if parts[0] == "stages" and len(parts) > 2:
        i = int(parts[1])
        if parts[2] == "downsample":
            return ".".join([f"network.{2 * i - 1}"] + parts[3:])
        if parts[2] == "blocks":
            return ".".join([f"network.{2 * i}"] + parts[3:])
    return name
