"""Drawing clusters and the command line (fec_core.visualize, chapter 11): mean colors,
boundaries, label matching, one panel per layer, the CLI on any image and its clear errors
(its refusals before any compute: test_reliability.py)."""
import numpy as np
import pytest
import torch

from conftest import UNEVEN, tiny_fec
from fec_core.interpret import merge_regions, trace_clusters
from fec_core.visualize import match_labels, select_layers


def test_paint_mean_colors_and_matching():
    from fec_core.visualize import boundaries, mean_colors, paint

    img = np.zeros((4, 4, 3), dtype=np.float32)
    img[:, :2, 0] = [[0.2, 0.4]] * 4
    labels = np.zeros((4, 4), dtype=int)
    labels[:, 2:] = 7
    mc = mean_colors(img, labels)
    assert np.allclose(mc[:, :2, 0], 0.3) and np.allclose(mc[:, 2:], 0)
    assert boundaries(labels)[:, 1].all() and boundaries(labels).sum() == 4
    out = paint(img, labels, color="palette", edges=False)
    assert out.shape == (4, 4, 3) and not np.allclose(out[0, 0], out[0, 3])
    with pytest.raises(ValueError, match="do not match"):
        paint(img, labels[:2])
    ref = np.array([[0, 0, 1, 1]])
    assert match_labels(np.array([[5, 5, 3, 3]]), ref).tolist() == [[0, 0, 1, 1]]


def test_select_layers_by_kind_position_and_name():
    """The maps to draw (``--layers``): the pooling hierarchy, the encode layers (one head or
    all), positions and names; an unknown layer is named in the error."""
    _, maps, _ = trace_clusters(tiny_fec(**UNEVEN).eval(), torch.randn(1, 3, 128, 192))
    assert [m.kind for m in select_layers(maps, "pool")] == ["stem", "pool", "pool", "pool"]
    assert len(select_layers(maps, "encode", head=None)) == 8 and len(select_layers(maps, "encode")) == 4
    assert [m.name for m in select_layers(maps, "0,-1")] == ["stem", "stages.3.blocks.0.token_mixer"]
    assert select_layers(maps, "stages.1.downsample")[0].title == "pool 1 (16x24)"
    with pytest.raises(ValueError, match="unknown layer"):
        select_layers(maps, "stages.9")
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        select_layers(maps, "9")


def test_plot_layers_one_panel_per_layer(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from fec_core.visualize import plot_layers, save_figure

    model = tiny_fec().eval()
    x = torch.rand(1, 3, 64, 64)
    _, maps, feats = trace_clusters(model, x)
    shown = select_layers(maps, "all")
    last_pool = [m for m in maps if m.kind == "pool"][-1]
    regions = merge_regions(feats[-1], last_pool.labels, 2)
    fig = plot_layers(x[0].permute(1, 2, 0), shown, regions, color="palette")
    assert sum(1 for ax in fig.axes if ax.images) == 1 + len(shown) + 1
    path = save_figure(fig, str(tmp_path / "sub" / "f.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def _cli(args, capsys):
    from fec_core.visualize import main

    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def test_cli_random_weights_any_image(tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "photo.webp"  # a format other than JPEG/PNG, not square
    Image.fromarray((np.random.default_rng(0).random((50, 90, 3)) * 255).astype(np.uint8)).save(img)
    out = tmp_path / "out.png"
    rc, text = _cli([img, "--model", "fec_tiny", "--size", "64", "--clusters", "2", "-o", out], capsys)
    assert rc == 0, text
    assert "RANDOM weights" in text and out.exists()
    assert "fed as 128x64 pixels" in text  # 50x90 -> shorter side 64, longer side a multiple of 32


def test_cli_clear_errors(tmp_path, capsys):
    import fec_core

    bad = tmp_path / "not_an_image.jpg"
    bad.write_bytes(b"hello, this is text")
    rc, text = _cli([bad, "--model", "fec_tiny", "-o", tmp_path / "o.png"], capsys)
    assert rc == 2 and "cannot read image" in text
    rc, text = _cli([tmp_path / "missing.png", "-o", tmp_path / "o.png"], capsys)
    assert rc == 2 and "image file not found" in text

    from PIL import Image

    img = tmp_path / "ok.png"
    Image.new("RGB", (64, 64), (120, 30, 200)).save(img)
    rc, text = _cli([img, "--model", "fec_tiny", "--checkpoint", tmp_path / "nope.pth"], capsys)
    assert rc == 2 and "checkpoint file not found" in text
    ckpt = tmp_path / "tiny.pth"
    torch.save({"model": fec_core.create_model("fec_tiny", num_classes=4).state_dict()}, ckpt)
    rc, text = _cli([img, "--model", "fec_small", "--checkpoint", ckpt, "--size", "64"], capsys)
    assert rc == 2 and "does not fit fec_small" in text
    rc, text = _cli([img, "--model", "fec_tiny", "--checkpoint", ckpt, "--size", "64", "-o", tmp_path / "t.png"],
                    capsys)
    assert rc == 0 and "loaded" in text and (tmp_path / "t.png").exists()
    rc, text = _cli([img, "--model", "resnet50"], capsys)
    assert rc == 2 and "unknown model" in text


def test_cli_merges_as_the_official_script_unless_asked(tmp_path, capsys, monkeypatch):
    """The merge panel is the official cluster_visualize.py procedure (paper_regions) by
    default, this library's variant (merge_regions on the last stage's features) with
    --regions features: each is what the library function gives on the same input."""
    import fec_core
    import fec_core.visualize.cli as V
    from PIL import Image

    from fec_core.data import normalize
    from fec_core.interpret import paper_regions

    img = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(1).random((64, 96, 3)) * 255).astype(np.uint8)).save(img)
    drawn = []
    real = V.plot_layers
    monkeypatch.setattr(V, "plot_layers", lambda x_img, shown, regions, **kw:
                        drawn.append((x_img, regions)) or real(x_img, shown, regions, **kw))
    texts = {}
    for choice in ("default", "paper", "features"):
        flag = [] if choice == "default" else ["--regions", choice]
        rc, texts[choice] = _cli([img, "--model", "fec_tiny", "--size", "128", "--clusters", "3", "--seed", "1",
                                  *flag, "-o", tmp_path / f"{choice}.png"], capsys)
        assert rc == 0, texts[choice]
    assert "(paper merge)" in texts["default"] and "(features merge)" in texts["features"]
    x_img = drawn[0][0]
    assert all(np.array_equal(x_img, d[0]) for d in drawn)
    torch.manual_seed(1)  # the CLI's random weights: --seed 1
    model = fec_core.create_model("fec_tiny").eval()
    x = normalize(torch.from_numpy(x_img).permute(2, 0, 1).unsqueeze(0))
    _, maps, feats = trace_clusters(model, x)
    last = [m for m in maps if m.kind == "pool"][-1]
    official = paper_regions(model, x, 3, seed=1)
    variant = merge_regions(feats[-1], last.labels, 3, seed=1)
    assert torch.equal(drawn[0][1], official) and torch.equal(drawn[1][1], official)
    assert torch.equal(drawn[2][1], variant)
    # two different procedures: on this image (24 final clusters) their partitions differ
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(official.flatten(), variant.flatten()) < 0.9
    with pytest.raises(SystemExit):
        V.main([str(img), "--regions", "kmeans", "-o", str(tmp_path / "x.png")])
    assert "invalid choice: 'kmeans'" in capsys.readouterr().err
