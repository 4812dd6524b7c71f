"""Offline data: the bundled photograph, generated ``shapes`` with masks, scanned ``digits``.

Nothing here downloads: the photograph is matplotlib's ``sample_data/grace_hopper.jpg``,
the digits are scikit-learn's bundled 8x8 scans (UCI), and ``shapes`` images are
drawn procedurally, deterministic from a seed.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["sample_image", "sample_image_path", "to_tensor", "normalize", "denormalize",
           "SHAPE_CLASSES", "make_shapes", "load_digits_arrays", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_image_path() -> str:
    """Path of the photograph bundled with matplotlib (Grace Hopper, 512x600 JPEG)."""
    import matplotlib

    return str(matplotlib.get_data_path() + "/sample_data/grace_hopper.jpg")


def sample_image(size: Optional[int] = 224, center_crop: bool = True) -> np.ndarray:
    """The bundled photograph as a float array ``[H, W, 3]`` in [0, 1].

    ``size``: resize the (center-cropped, square) image to ``size x size``; ``None`` keeps it.
    """
    from PIL import Image

    img = Image.open(sample_image_path()).convert("RGB")
    if center_crop:
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if size is not None:
        img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def to_tensor(img: np.ndarray, normalized: bool = True) -> torch.Tensor:
    """``[H, W, 3]`` array in [0, 1] -> ``[1, 3, H, W]`` tensor (ImageNet-normalized by default)."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).unsqueeze(0).float()
    return normalize(x) if normalized else x


def normalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalization of ``[B, 3, H, W]`` in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`, clipped to [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
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


def make_shapes(n: int, size: int = 64, seed: int = 0, classes: Tuple[str, ...] = SHAPE_CLASSES
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generate the ``shapes`` dataset: one shape on a textured background per image.

    Returns ``images`` float ``[n, 3, size, size]`` in [0, 1], ``labels`` long ``[n]``
    (index into ``classes``), ``masks`` bool ``[n, size, size]`` (True on the shape).
    Deterministic from ``seed``; the shape's color is kept apart from the background's.
    """
    if n <= 0 or size < 16:
        raise ValueError(f"make_shapes needs n > 0 and size >= 16, got n={n}, size={size}")
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.float32)
    masks = np.empty((n, size, size), dtype=bool)
    labels = rng.integers(0, len(classes), size=n)
    for i in range(n):
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
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x.repeat(1, 3, 1, 1), torch.from_numpy(d.target).long()
