"""Drawing FEC's clusters (book chapter 11), and the ``fec-visualize`` command.

Figures in the spirit of the paper's Figure 3: the image, one small panel per clustering layer
with every pixel painted by its cluster (traced to the pixels by :mod:`fec_core.interpret`),
then the final representatives merged into ``k`` regions.

Command line (any image Pillow reads)::

    python -m fec_core.visualize photo.jpg -o clusters.png
    python -m fec_core.visualize photo.jpg --checkpoint fec_small.pth --clusters 3 -o out.png
    python -m fec_core.visualize shape.png --model fec_tiny --size 64 --layers pool -o out.png
    python -m fec_core.visualize photo.jpg --regions features -o out.png

Without ``--checkpoint`` the weights are random (the command says so). The merge panel is
drawn as the official ``cluster_visualize.py`` draws the paper's figures
(:func:`fec_core.interpret.paper_regions`) unless ``--regions features`` asks for this
library's variant (:func:`fec_core.interpret.merge_regions` on the last stage's features).

The parts: :mod:`~fec_core.visualize.drawing` (colors, panels, figures, saving them) and
:mod:`~fec_core.visualize.cli` (the command). Every public name is importable from
``fec_core.visualize``.
"""
from .cli import MAX_GMACS, fed_size, load_image, load_model, main, prepare_image
from .drawing import (PALETTE, boundaries, check_output, match_labels, mean_colors, paint, palette_colors,
                      plot_layers, plot_regions, save_figure, select_layers)

__all__ = ["PALETTE", "mean_colors", "palette_colors", "boundaries", "paint", "match_labels", "select_layers",
           "plot_layers", "plot_regions", "save_figure", "check_output", "load_image", "fed_size",
           "prepare_image", "load_model", "MAX_GMACS", "main"]
