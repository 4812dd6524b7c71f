"""Offline data: bundled photographs, generated ``shapes`` with masks, scanned ``digits``.

Nothing here downloads: the photographs ship inside the dependencies (:data:`PHOTOGRAPHS`:
matplotlib's ``sample_data/grace_hopper.jpg``, scikit-learn's ``china.jpg`` and
``flower.jpg``), the digits are scikit-learn's bundled 8x8 scans (UCI), and ``shapes``
images are drawn procedurally, deterministic from a seed.

For training (chapter 10): :func:`digits_datasets`, :func:`shapes_datasets` (torch
Datasets built from the arrays above) and :class:`ImageFolderDataset` (torchvision's
``ImageFolder`` with clear errors) / :func:`image_folder_datasets` for folders in the
ImageNet layout.

ImageNet normalization (:func:`normalize`) is torchvision's with timm's
``IMAGENET_DEFAULT_MEAN`` / ``IMAGENET_DEFAULT_STD``, the statistics the models' ``default_cfgs``
name.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import matplotlib
import numpy as np
import sklearn.datasets
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.model_selection import train_test_split
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.datasets import ImageFolder
from torchvision.datasets import folder as tv_folder
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

__all__ = ["PHOTOGRAPHS", "photograph", "photograph_path", "sample_image", "sample_image_path", "to_tensor",
           "normalize", "denormalize", "SHAPE_CLASSES", "make_shapes", "load_digits_arrays", "TensorImageDataset",
           "builtin_transform", "stratified_split", "digits_datasets", "shapes_datasets", "ImageFolderDataset",
           "image_folder_datasets"]


#: The photographs that ship inside the dependencies, by name: what they show and where
#: they come from. :func:`photograph` loads them.
PHOTOGRAPHS = {
    "hopper": "Grace Hopper in uniform, before a flag (matplotlib, sample_data/grace_hopper.jpg)",
    "china": "a Chinese temple among trees (scikit-learn, datasets/images/china.jpg)",
    "flower": "a flower on dark leaves (scikit-learn, datasets/images/flower.jpg)",
}


def photograph_path(name: str = "hopper") -> str:
    """Path of the bundled photograph ``name`` (one of :data:`PHOTOGRAPHS`)."""
    if name == "hopper":
        return os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    if name in ("china", "flower"):
        return os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", f"{name}.jpg")
    raise ValueError(f"unknown photograph {name!r}; choose one of {', '.join(PHOTOGRAPHS)}")


def photograph(name: str = "hopper", size: Optional[int] = 224, center_crop: bool = True) -> np.ndarray:
    """The bundled photograph ``name`` (:data:`PHOTOGRAPHS`) as a float array ``[H, W, 3]`` in [0, 1].

    ``center_crop``: cut the central square first; ``size``: then resize to
    ``size x size`` (bicubic); ``None`` keeps the size.
    """
    img = Image.open(photograph_path(name)).convert("RGB")
    if center_crop:
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if size is not None:
        img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def sample_image_path() -> str:
    """Path of the book's main photograph (Grace Hopper, 512x600 JPEG, bundled with matplotlib)."""
    return photograph_path("hopper")


def sample_image(size: Optional[int] = 224, center_crop: bool = True) -> np.ndarray:
    """The book's main photograph (``photograph("hopper")``) as a float array ``[H, W, 3]`` in [0, 1].

    ``size``: resize the (center-cropped, square) image to ``size x size``; ``None`` keeps it.
    """
    return photograph("hopper", size, center_crop)


def to_tensor(img: np.ndarray, normalized: bool = True) -> torch.Tensor:
    """``[H, W, 3]`` array in [0, 1] -> ``[1, 3, H, W]`` tensor (ImageNet-normalized by default)."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).unsqueeze(0).float()
    return normalize(x) if normalized else x


def normalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalization of float images ``[B, 3, H, W]`` (or ``[3, H, W]``) in
    [0, 1]: torchvision's ``normalize`` with timm's ``IMAGENET_DEFAULT_MEAN`` / ``_STD``."""
    return TF.normalize(x, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize` for ``[B, 3, H, W]``, clipped to [0, 1]."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


# ---------------------------------------------------------------------------- shapes
#: Classes of the ``shapes`` dataset.
SHAPE_CLASSES = ("circle", "square", "triangle", "cross")


def _shape_mask(kind: int, size: int, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dy, dx = yy - cy, xx - cx
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotated coordinates
    if kind == 0:  # circle
        return dx * dx + dy * dy <= r * r
    if kind == 1:  # square
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    if kind == 2:  # triangle (equilateral, pointing along v)
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = angle + math.pi / 2 + k * 2 * math.pi / 3
            inside &= (math.cos(a) * dx + math.sin(a) * dy) <= r * 0.55
        return inside
    if kind == 3:  # cross
        w = r * 0.38
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    raise ValueError(f"unknown shape class {kind}")


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colored texture ``[size, size, 3]`` in [0, 1] (low-frequency noise)."""
    base = rng.uniform(0.15, 0.85, size=3).astype(np.float32)
    noise = torch.from_numpy(rng.normal(0, 1, size=(1, 3, 6, 6)).astype(np.float32))
    noise = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    stripes = np.sin(np.linspace(0, rng.uniform(2, 8) * math.pi, size, dtype=np.float32))
    stripes = stripes[None, :, None] if rng.random() < 0.5 else stripes[:, None, None]
    img = base + 0.12 * noise + 0.06 * stripes * rng.uniform(-1, 1, size=3).astype(np.float32)
    return np.clip(img, 0, 1)


def _grain_on_blobs(rng: np.random.Generator, size: int, mask: np.ndarray) -> np.ndarray:
    """A ``contrast="texture"`` image ``[size, size, 3]``: figure and ground differ only in texture.

    One smooth colored field (:func:`_texture`) under the whole image, modulated in brightness
    by ``+-amp``: a one-pixel checkerboard (fine grain) on the shape, smooth blobs of the same
    amplitude (``tanh`` of low-frequency noise, mostly near ``+-1``) elsewhere. Both
    modulations are symmetric around zero, so figure and ground have the same colors.
    """
    field = _texture(rng, size)
    amp = rng.uniform(0.15, 0.25)
    blobs = torch.from_numpy(rng.normal(0, 1, size=(1, 1, 8, 8)).astype(np.float32))
    blobs = F.interpolate(blobs, size=(size, size), mode="bicubic", align_corners=False)[0, 0].numpy()
    ground = np.tanh(3 * blobs / (blobs.std() + 1e-6))
    yy, xx = np.mgrid[0:size, 0:size]
    grain = np.where((yy + xx) % 2 == 0, 1.0, -1.0).astype(np.float32)
    return np.clip(field + amp * np.where(mask, grain, ground)[..., None], 0, 1)


def make_shapes(n: int, size: int = 64, seed: int = 0, classes: Tuple[str, ...] = SHAPE_CLASSES,
                contrast: str = "color") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generate the ``shapes`` dataset: one shape on a textured background per image.

    Returns ``images`` float ``[n, 3, size, size]`` in [0, 1], ``labels`` long ``[n]``
    (index into ``classes``), ``masks`` bool ``[n, size, size]`` (True on the shape).
    Deterministic from ``seed``. ``contrast`` says what sets the shape apart:
    ``"color"`` (the default): its color is kept apart from the background's;
    ``"texture"``: only its texture, a fine checkerboard grain against smooth blobs over one
    shared colored field (same colors inside and out; chapter 11 uses it to measure
    segmentation that pixel colors alone cannot give).
    """
    if n <= 0 or size < 16:
        raise ValueError(f"make_shapes needs n > 0 and size >= 16, got n={n}, size={size}")
    if contrast not in ("color", "texture"):
        raise ValueError(f"contrast must be 'color' or 'texture', got {contrast!r}")
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.float32)
    masks = np.empty((n, size, size), dtype=bool)
    labels = rng.integers(0, len(classes), size=n)
    for i in range(n):
        if contrast == "texture":
            r = rng.uniform(0.16, 0.3) * size
            cy, cx = rng.uniform(r + 1, size - r - 1, size=2)
            mask = _shape_mask(int(labels[i]) % 4, size, cy, cx, r, rng.uniform(0, 2 * math.pi))
            images[i] = _grain_on_blobs(rng, size, mask)
            masks[i] = mask
            continue
        bg = _texture(rng, size)
        r = rng.uniform(0.16, 0.3) * size
        cy, cx = rng.uniform(r + 1, size - r - 1, size=2)
        mask = _shape_mask(int(labels[i]) % 4, size, cy, cx, r, rng.uniform(0, 2 * math.pi))
        fg = _texture(rng, size)
        shift = rng.uniform(0.3, 0.5, size=3) * rng.choice([-1.0, 1.0], size=3)
        fg = np.clip(np.where((bg.mean((0, 1)) + shift > 1) | (bg.mean((0, 1)) + shift < 0),
                              fg - shift, fg + shift), 0, 1)
        images[i] = np.where(mask[..., None], fg, bg)
        masks[i] = mask
    return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long(),
            torch.from_numpy(masks))


# ---------------------------------------------------------------------------- digits
def load_digits_arrays(size: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes).

    Returns ``images`` float ``[1797, 3, size, size]`` in [0, 1] (gray, repeated to RGB,
    bilinearly resized) and ``labels`` long ``[1797]``.
    """
    d = sklearn.datasets.load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x.repeat(1, 3, 1, 1), torch.from_numpy(d.target).long()


# ---------------------------------------------------------------------------- datasets for training
# Torch Datasets for :mod:`fec_core.train` (chapter 10). Each yields ``(image, target)``:
# ``image`` a normalized float tensor ``[3, H, W]``, ``target`` a class index (or, for
# ``shapes`` with ``target="mask"``, a per-pixel class map ``[H, W]``).


class TensorImageDataset(torch.utils.data.Dataset):
    """In-memory images ``[n, 3, s, s]`` in [0, 1] with targets ``[n]`` (or ``[n, s, s]``).

    ``__getitem__`` returns ``(normalize(transform(image)), target)``; ``transform`` (e.g.
    the light augmentation of :func:`builtin_transform`) works on a ``[3, s, s]`` tensor
    in [0, 1] and is applied to the image only. ``classes``: class names; ``masks``
    (optional, ``[n, s, s]`` bool) travel along for interpretability work.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classes: Tuple[str, ...],
                 transform=None, masks: Optional[torch.Tensor] = None, normalized: bool = True):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [n, 3, H, W], got {tuple(images.shape)}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images, self.targets, self.classes = images, targets, tuple(classes)
        self.transform, self.masks, self.normalized = transform, masks, normalized

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = self.images[i]
        if self.transform is not None:
            x = self.transform(x)
        if self.normalized:
            x = normalize(x.unsqueeze(0))[0]
        return x, self.targets[i]


def builtin_transform(augment: bool = True, degrees: float = 10.0, translate: float = 0.1,
                      scale: Tuple[float, float] = (0.9, 1.1)):
    """Light augmentation for the small built-in datasets: a random affine warp (rotation
    ``degrees``, shift ``translate`` x size, zoom ``scale``) on ``[3, s, s]`` tensors; no flips
    (a flipped digit is another symbol). ``augment=False`` -> ``None``."""
    if not augment:
        return None
    return v2.RandomAffine(degrees=degrees, translate=(translate, translate), scale=scale)


def stratified_split(labels: torch.Tensor, val_fraction: float = 0.25, seed: int = 0
                     ) -> Tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)`` of a stratified, seeded split (each class keeps its share)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    idx = np.arange(len(labels))
    train, val = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=np.asarray(labels))
    return np.sort(train), np.sort(val)


def digits_datasets(size: int = 32, val_fraction: float = 0.25, seed: int = 0, augment: bool = True
                    ) -> Tuple[TensorImageDataset, TensorImageDataset]:
    """The ``digits`` dataset for training: ``(train, val)``, a stratified seeded split
    (``val_fraction`` held out, 450 of 1,797 images by default). 10 classes ``'0'..'9'``;
    the training part gets :func:`builtin_transform` when ``augment``."""
    images, labels = load_digits_arrays(size)
    tr, va = stratified_split(labels, val_fraction, seed)
    classes = tuple(str(i) for i in range(10))
    return (TensorImageDataset(images[tr], labels[tr], classes, builtin_transform(augment)),
            TensorImageDataset(images[va], labels[va], classes))


def shapes_datasets(n_train: int = 2000, n_val: int = 500, size: int = 64, seed: int = 0, target: str = "label",
                    augment: bool = False) -> Tuple[TensorImageDataset, TensorImageDataset]:
    """The ``shapes`` dataset for training: ``(train, val)`` from one :func:`make_shapes` call
    (``n_train + n_val`` images, deterministic from ``seed``; the first ``n_train`` train).

    ``target="label"``: class index into :data:`SHAPE_CLASSES`; ``target="mask"``: a per-pixel
    class map ``[size, size]`` (long; 0 background, ``1 + label`` on the shape, classes
    ``("background",) + SHAPE_CLASSES``). Both datasets keep the boolean ``masks``.
    ``augment`` (labels only; a warp would move the masks) adds :func:`builtin_transform`.
    """
    if target not in ("label", "mask"):
        raise ValueError(f"target must be 'label' or 'mask', got {target!r}")
    if augment and target == "mask":
        raise ValueError("augment=True would move the images but not their masks; use target='label'")
    images, labels, masks = make_shapes(n_train + n_val, size, seed)
    if target == "mask":
        targets, classes = masks.long() * (1 + labels.view(-1, 1, 1)), ("background",) + SHAPE_CLASSES
    else:
        targets, classes = labels, SHAPE_CLASSES
    tr, va = slice(0, n_train), slice(n_train, n_train + n_val)
    return (TensorImageDataset(images[tr], targets[tr], classes, builtin_transform(augment), masks[tr]),
            TensorImageDataset(images[va], targets[va], classes, None, masks[va]))


def _is_image(path: str) -> bool:
    """A file torchvision's ``ImageFolder`` reads (its ``IMG_EXTENSIONS``), not hidden, not in a hidden folder."""
    return (tv_folder.has_file_allowed_extension(path, tv_folder.IMG_EXTENSIONS)
            and not os.path.basename(path).startswith(".") and not os.path.basename(os.path.dirname(path)).startswith("."))


def _load_rgb(path: str) -> Image.Image:
    """An image file as a PIL RGB image, or an ``OSError`` naming the file."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as e:
        raise OSError(f"cannot read image {path}: {e}") from e


class ImageFolderDataset(ImageFolder):
    """torchvision's ``ImageFolder``: images in the ImageNet layout, ``root/<class>/<image>``
    (e.g. ``train/n01440764/x.JPEG``), ``(transform(image), class index)``.

    What it adds: the class order can be fixed (``classes``, e.g. the training split's for the
    validation split, which may lack some classes but not have others); hidden folders and files
    are skipped; clear errors for a missing folder, no class folders, class folders without
    images (all of them named) and, when an image is loaded, an unreadable file (its path named).
    ``transform`` maps a PIL RGB image to a tensor (e.g. ``timm.data.create_transform``).
    """

    def __init__(self, root: str, transform=None, classes: Optional[Tuple[str, ...]] = None):
        root = str(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"dataset folder not found: {root}")
        self._fixed_classes = tuple(classes) if classes is not None else None
        super().__init__(root, transform=transform, loader=_load_rgb, is_valid_file=_is_image)

    def find_classes(self, directory: str):
        found = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not found:
            raise FileNotFoundError(f"dataset folder {directory} has no class folders; expected the ImageNet layout "
                                    f"{directory}/<class>/<image>.JPEG")
        classes = self._fixed_classes or tuple(found)
        extra = sorted(set(found) - set(classes))
        if extra:
            raise ValueError(f"{directory} has class folders the training split does not have: {extra[:8]}")
        return classes, {c: i for i, c in enumerate(classes)}

    def make_dataset(self, directory: str, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """torchvision's ``make_dataset`` over the class folders that exist (a validation split
        may lack some of the training split's classes); an empty one is an error naming all."""
        present = {c: i for c, i in class_to_idx.items() if os.path.isdir(os.path.join(directory, c))}
        try:
            return tv_folder.make_dataset(directory, present, extensions=extensions, is_valid_file=is_valid_file)
        except FileNotFoundError:  # torchvision names the classes; this names the folders and what counts
            empty = [c for c in sorted(present)
                     if not any(_is_image(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(directory, c))
                                for f in fs)]
            raise FileNotFoundError(
                f"{len(empty)} class folder(s) in {directory} hold no images ({', '.join(tv_folder.IMG_EXTENSIONS)}): "
                f"{', '.join(empty[:8])}{' ...' if len(empty) > 8 else ''}") from None


def image_folder_datasets(root: str, train_transform=None, val_transform=None, train_split: str = "train",
                          val_split: str = "val") -> Tuple[ImageFolderDataset, ImageFolderDataset]:
    """``(train, val)`` image-folder datasets from ``root/train`` and ``root/val`` (ImageNet layout);
    the validation split uses the training split's class order."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder not found: {root}")
    for split in (train_split, val_split):
        if not os.path.isdir(os.path.join(root, split)):
            raise FileNotFoundError(f"{root} has no '{split}' folder; expected {root}/{train_split}/<class>/*.JPEG "
                                    f"and {root}/{val_split}/<class>/*.JPEG")
    train = ImageFolderDataset(os.path.join(root, train_split), train_transform)
    return train, ImageFolderDataset(os.path.join(root, val_split), val_transform, classes=train.classes)
