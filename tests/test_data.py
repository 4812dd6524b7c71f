"""The datasets (fec_core.data): the synthetic ``shapes``, the seeded stratified split, the
in-memory dataset, the normalization, and image folders with their clear errors (image
folders through a whole training run: test_train.py)."""
import numpy as np
import pytest
import torch

from conftest import write_png
from fec_core.data import (SHAPE_CLASSES, ImageFolderDataset, TensorImageDataset, denormalize,
                           image_folder_datasets, make_shapes, normalize, shapes_datasets, stratified_split)


@pytest.mark.parametrize("contrast", ["color", "texture"])
def test_make_shapes_is_seeded_and_its_masks_mark_the_shape(contrast):
    images, labels, masks = make_shapes(6, 32, seed=3, contrast=contrast)
    assert images.shape == (6, 3, 32, 32) and labels.shape == (6,) and masks.shape == (6, 32, 32)
    assert images.dtype == torch.float32 and masks.dtype == torch.bool and 0 <= images.min() <= images.max() <= 1
    assert int(labels.max()) < len(SHAPE_CLASSES) and all(0 < int(m.sum()) < 32 * 32 for m in masks)
    again = make_shapes(6, 32, seed=3, contrast=contrast)
    assert all(torch.equal(a, b) for a, b in zip((images, labels, masks), again))
    assert not torch.equal(make_shapes(6, 32, seed=4, contrast=contrast)[0], images)
    with pytest.raises(ValueError, match="size >= 16"):
        make_shapes(2, 8)
    with pytest.raises(ValueError, match="contrast"):
        make_shapes(2, 32, contrast="edges")


def test_shapes_datasets_split_one_draw_and_give_masks_as_targets():
    """``target="mask"``: 0 on the background, ``1 + label`` on the shape (the segmentation
    task of chapter 13, ``fec_core.seg.shapes_segmentation``)."""
    tr, va = shapes_datasets(6, 2, size=32, seed=3, target="mask")
    images, labels, masks = make_shapes(8, 32, seed=3)
    assert len(tr) == 6 and len(va) == 2 and tr.classes == ("background",) + SHAPE_CLASSES
    x, y = tr[1]
    assert x.shape == (3, 32, 32) and y.dtype == torch.long
    assert torch.equal(y, masks[1].long() * (1 + labels[1]))
    x, y = va[1]  # the 8th image of the draw
    torch.testing.assert_close(denormalize(x[None])[0], images[7])
    assert torch.equal(y, masks[7].long() * (1 + labels[7]))


def test_stratified_split_is_seeded_and_keeps_each_class_share():
    labels = torch.tensor([0] * 40 + [1] * 20 + [2] * 12)
    train, val = stratified_split(labels, 0.25, seed=1)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(72))
    assert np.bincount(labels[val].numpy()).tolist() == [10, 5, 3]
    assert all(np.array_equal(a, b) for a, b in zip((train, val), stratified_split(labels, 0.25, seed=1)))
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(labels, 1.0)


def test_tensor_dataset_normalizes_and_checks_its_inputs():
    images = torch.rand(3, 3, 8, 8)
    ds = TensorImageDataset(images, torch.tensor([0, 1, 0]), ("a", "b"))
    x, y = ds[1]
    assert torch.equal(x, normalize(images[1:2])[0]) and y == 1
    torch.testing.assert_close(denormalize(x[None])[0], images[1])
    with pytest.raises(ValueError, match=r"\[n, 3, H, W\]"):
        TensorImageDataset(torch.rand(3, 1, 8, 8), torch.zeros(3), ("a",))
    with pytest.raises(ValueError, match="3 images but 2 targets"):
        TensorImageDataset(images, torch.zeros(2), ("a",))


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        image_folder_datasets(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="has no 'train' folder"):
        image_folder_datasets(str(tmp_path))
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        image_folder_datasets(str(tmp_path))
    for c in ("cat", "dog"):
        (tmp_path / "train" / c).mkdir()
    write_png(tmp_path / "train" / "cat" / "a.png")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match="hold no images.*dog"):
        image_folder_datasets(str(tmp_path))
    (tmp_path / "train" / "dog" / "broken.JPEG").write_bytes(b"\xff\xd8 truncated")
    ds = ImageFolderDataset(str(tmp_path / "train"))
    assert ds.classes == ("cat", "dog") and len(ds) == 2
    assert ds[0][0].size == (40, 40)
    with pytest.raises(OSError, match="cannot read image .*broken.JPEG"):
        ds[1]
