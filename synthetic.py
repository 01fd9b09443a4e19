"""The miniature's data: `--data synthetic[:N_TRAIN[:N_VAL]]`, procedural labelled images of shapes and textures
(optional neighbour of common.py, imported by common.build_dataset; without this file --data takes image folders).

Deterministic: image i of a split is a pure function of (seed, split, i), at any image size, so the miniature
(make demo, make repro, the tests) needs no download.
"""
import numpy as np
import torch
from PIL import Image

import common

# Each class is one shape filled with one texture (shape/texture); grey levels are random per image.
SYNTHETIC_CLASSES = ("disk/solid", "square/h-stripes", "triangle/v-stripes", "ring/diag", "plus/checker",
                     "diamond/dots", "square/rings", "disk/checker", "triangle/solid", "diamond/h-stripes")


class SyntheticShapes(torch.utils.data.Dataset):
    """Procedural labelled dataset: 10 classes, each one shape filled with one texture (see
    SYNTHETIC_CLASSES), with random fill/pattern grey levels, position, scale and small rotation on a
    random grey gradient+noise background. Returned as RGB (three equal channels).

    Brightness carries no class information: a method must become invariant to it and to the background
    and pick up texture (local) and shape (global). Two classes share each shape and most textures
    appear twice, so neither cue alone suffices for every class. Grey levels rather than colours, and a
    bounded brightness nuisance (background levels in [0.4, 0.6], first fill level in [0.2, 0.8], the second
    0.35-0.65 away, wrapped): with free colours or brightness those dominate a tiny encoder's features and
    hide every method effect the miniature is meant to show (lab/findings.md).
    Deterministic: image i of split s is a pure function of (seed, s, i). Any image size.
    """

    def __init__(self, size: int, img_size: int = 32, split: str = "train", seed: int = 0, num_classes: int = 10,
                 transform=None):
        assert 2 <= num_classes <= len(SYNTHETIC_CLASSES)
        self.size, self.img_size, self.seed, self.num_classes = size, img_size, seed, num_classes
        self.split_id = {"train": 0, "val": 1}[split]
        self.transform = transform
        self.classes = list(SYNTHETIC_CLASSES[:num_classes])
        self.targets = [i % num_classes for i in range(size)]

    def __len__(self):
        return self.size

    def render(self, index: int) -> tuple[np.ndarray, int]:
        rng = np.random.default_rng([self.seed, self.split_id, index])
        label = index % self.num_classes
        S = self.img_size
        yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S  # [0, 1)
        # background: a linear gradient between two grey levels in [0.4, 0.6], plus pixel noise (see the
        # docstring for why the range is narrow)
        b0, b1 = rng.uniform(0.4, 0.6, 2)
        a = rng.uniform(0, 2 * np.pi)
        t = np.cos(a) * xx + np.sin(a) * yy
        img = b0 * (1 - t) + b1 * t + rng.normal(0, 0.02, (S, S))
        # object: centre, radius, small rotation; fill and pattern grey levels at least 0.35 apart
        r = rng.uniform(0.3, 0.45)
        cx, cy = rng.uniform(r * 0.7, 1 - r * 0.7, 2)
        rot = rng.uniform(-0.25, 0.25)
        fill = rng.uniform(0.2, 0.8)
        fill2 = (fill + rng.uniform(0.35, 0.65)) % 1.0
        u0, v0 = (xx - cx) / r, (yy - cy) / r
        u = np.cos(rot) * u0 + np.sin(rot) * v0
        v = -np.sin(rot) * u0 + np.cos(rot) * v0
        rad = np.sqrt(u ** 2 + v ** 2)
        box = (np.abs(u) < 0.85) & (np.abs(v) < 0.85)
        shape, texture = SYNTHETIC_CLASSES[label].split("/")
        region = {
            "disk": rad < 0.95, "square": box, "diamond": (np.abs(u) + np.abs(v)) < 1.0,
            "triangle": (v > -0.85) & (v < 0.85) & (np.abs(u) < (v + 0.85) * 0.65),
            "ring": (rad < 1.0) & (rad > 0.45),
            "plus": ((np.abs(u) < 0.38) & (np.abs(v) < 1.0)) | ((np.abs(v) < 0.38) & (np.abs(u) < 1.0)),
        }[shape]
        k = np.pi * S * r / 3.0  # texture period of about 6 pixels whatever the image size
        pattern = {
            "solid": np.zeros_like(u, dtype=bool), "h-stripes": np.sin(v * k) > 0, "v-stripes": np.sin(u * k) > 0,
            "diag": np.sin((u + v) * k / 1.4) > 0, "checker": np.sin(u * k) * np.sin(v * k) > 0,
            "dots": (np.sin(u * k) > 0.5) & (np.sin(v * k) > 0.5), "rings": np.sin(rad * k) > 0,
        }[texture]
        img = np.where(region & ~pattern, fill, img)
        img = np.where(region & pattern, fill2, img)
        img = np.repeat(img[..., None], 3, axis=-1)  # (S, S, 3)
        return (np.clip(img, 0, 1) * 255).astype(np.uint8), label

    def __getitem__(self, index):
        arr, label = self.render(index)
        img = Image.fromarray(arr)
        return (self.transform(img) if self.transform else img), label


def parse_synthetic(spec: str) -> tuple[int, int] | None:
    """`synthetic[:N_TRAIN[:N_VAL]]` -> (n_train, n_val); defaults 2000 / 500. None for anything else (a path,
    also one that merely starts with "synthetic", e.g. synthetic_photos/)."""
    if spec != "synthetic" and not spec.startswith("synthetic:"):
        return None
    parts = spec.split(":")
    try:
        n_train = int(parts[1]) if len(parts) > 1 else 2000
        n_val = int(parts[2]) if len(parts) > 2 else 500
        if len(parts) > 3 or n_train < 1 or n_val < 1:
            raise ValueError
    except ValueError:
        raise common.UserError(f"--data {spec!r}: expected synthetic[:N_TRAIN[:N_VAL]] with positive counts, e.g. "
                        f"synthetic:2000:500 (a folder whose name starts with synthetic: pass it as ./{spec})") from None
    return n_train, n_val


def dataset(spec: str, split: str, transform, img_size: int, seed: int) -> SyntheticShapes:
    """The `split` ("train" or "val") of `--data spec`, rendered at `img_size`."""
    n_train, n_val = parse_synthetic(spec)
    return SyntheticShapes(n_train if split == "train" else n_val, img_size=img_size, split=split, seed=seed,
                           transform=transform)
