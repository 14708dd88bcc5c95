"""Synthetic CelebA: cartoon faces whose 40 binary attributes are all visible and correlated like the real ones.

Real CelebA images are not committed, so tests and smoke runs use faces drawn here with numpy masks. Every
attribute drives its own visible feature (a region's colour, a shape, a texture, blur...), so a model can
learn each of them from the pixels; attributes are sampled from latent factors (gender, age, smile, hair
colour) through fixed logistic tables, so groups of attributes are correlated as in the real data (e.g. Male
with Goatee/Mustache/Sideburns and against Heavy_Makeup/Wearing_Lipstick; Young against Gray_Hair;
Smiling with Mouth_Slightly_Open/High_Cheekbones), which is what multi-task branching feeds on.
"""

from __future__ import annotations

import math

import numpy as np

from l2b_fast.data.labels import LABELS_MEMBER, check_label_fraction, count_labels, sample_labels
from l2b_fast.data.shards import encode_png, prepare_output_dir, split_counts, write_manifest, write_split
from l2b_fast.datasets.celeba.dataset import ATTRIBUTES

__all__ = ["ATTRIBUTES", "sample_attributes", "render_face", "generate"]

_INDEX = {name: i for i, name in enumerate(ATTRIBUTES)}

# logit = bias + w_male * male + w_young * young + w_smile * smile (latents in {0, 1})
_LOGITS = {
    "5_o_Clock_Shadow": (-3.0, 3.0, 0.0, 0.0),
    "Arched_Eyebrows": (-0.5, -2.5, 0.5, 0.0),
    "Attractive": (-1.0, -1.0, 2.0, 0.5),
    "Bags_Under_Eyes": (-0.5, 1.0, -1.5, 0.0),
    "Bald": (-4.0, 2.0, -1.5, 0.0),
    "Bangs": (-1.5, -0.5, 0.5, 0.0),
    "Big_Lips": (-1.0, -0.5, 0.0, 0.0),
    "Big_Nose": (-1.5, 1.5, -0.5, 0.0),
    "Blurry": (-2.5, 0.0, 0.0, 0.0),
    "Bushy_Eyebrows": (-2.5, 1.5, 0.0, 0.0),
    "Chubby": (-3.0, 1.0, -1.0, 0.0),
    "Double_Chin": (-3.5, 1.0, -1.5, 0.0),
    "Eyeglasses": (-2.5, 0.8, -0.8, 0.0),
    "Goatee": (-3.5, 3.0, 0.0, 0.0),
    "Heavy_Makeup": (0.5, -4.0, 0.5, 0.0),
    "High_Cheekbones": (-1.5, -0.5, 0.0, 2.5),
    "Mouth_Slightly_Open": (-1.5, 0.0, 0.0, 2.5),
    "Mustache": (-4.0, 3.0, -0.5, 0.0),
    "Narrow_Eyes": (-2.0, 0.0, 0.0, 0.5),
    "No_Beard": (3.0, -3.0, 0.5, 0.0),
    "Oval_Face": (-1.0, 0.0, 0.3, 0.0),
    "Pale_Skin": (-3.0, -0.5, 0.5, 0.0),
    "Pointy_Nose": (-1.0, -0.5, 0.0, 0.0),
    "Receding_Hairline": (-3.0, 1.0, -1.0, 0.0),
    "Rosy_Cheeks": (-3.0, -1.0, 0.5, 1.0),
    "Sideburns": (-3.5, 3.0, 0.0, 0.0),
    "Straight_Hair": (-1.0, 0.0, 0.0, 0.0),
    "Wavy_Hair": (-0.5, -1.5, 0.0, 0.0),
    "Wearing_Earrings": (-0.5, -3.0, 0.0, 0.0),
    "Wearing_Hat": (-3.0, 0.0, 0.0, 0.0),
    "Wearing_Lipstick": (1.0, -4.5, 0.5, 0.0),
    "Wearing_Necklace": (-1.5, -1.5, 0.0, 0.0),
    "Wearing_Necktie": (-4.0, 2.5, -0.5, 0.0),
}
_HAIR = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair", None)  # None: another colour (auburn)
_HAIR_COLOURS = {
    "Black_Hair": (0.08, 0.07, 0.07),
    "Blond_Hair": (0.92, 0.82, 0.45),
    "Brown_Hair": (0.45, 0.28, 0.12),
    "Gray_Hair": (0.72, 0.72, 0.74),
}


def sample_attributes(rng: np.random.Generator) -> np.ndarray:
    """40 attributes (int64 0/1, :data:`ATTRIBUTES` order) from the latent gender/age/smile/hair factors."""
    male, young, smile = rng.random() < 0.42, rng.random() < 0.77, rng.random() < 0.48
    attrs = np.zeros(len(ATTRIBUTES), dtype=np.int64)
    attrs[_INDEX["Male"]], attrs[_INDEX["Young"]], attrs[_INDEX["Smiling"]] = male, young, smile
    for name, (bias, w_male, w_young, w_smile) in _LOGITS.items():
        logit = bias + w_male * male + w_young * young + w_smile * smile
        attrs[_INDEX[name]] = rng.random() < 1.0 / (1.0 + math.exp(-logit))
    hair = np.array([0.35, 0.05, 0.25, 0.05, 0.30]) if male else np.array([0.25, 0.30, 0.30, 0.02, 0.13])
    if not young:
        hair = hair + np.array([0.0, 0.0, 0.0, 0.45, 0.0])
    choice = _HAIR[rng.choice(len(_HAIR), p=hair / hair.sum())]
    if choice is not None:
        attrs[_INDEX[choice]] = 1
    return attrs


def _blur(img: np.ndarray) -> np.ndarray:
    for _ in range(2):
        p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
        img = (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] + 2 * p[1:-1, 1:-1]) / 6
    return img


def render_face(attributes, size: int = 64, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw a uint8 ``size`` x ``size`` x 3 face showing ``attributes`` (40 ints 0/1).

    ``rng`` draws only nuisances (small shifts, tone jitter, pixel noise): with the same rng state, flipping one
    attribute changes the image, which the tests check for all 40. Features are sized for size >= 48.
    """
    a = {name: bool(v) for name, v in zip(ATTRIBUTES, np.asarray(attributes).tolist(), strict=True)}
    rng = rng if rng is not None else np.random.default_rng(0)
    dx, dy = rng.uniform(-0.04, 0.04, 2)
    jitter = rng.uniform(0.95, 1.05, 3)
    coords = (np.arange(size) + 0.5) / size * 2 - 1
    x, y = coords[None, :] - dx, coords[:, None] - dy  # y grows downwards
    x, y = np.broadcast_to(x, (size, size)), np.broadcast_to(y, (size, size))

    img = np.empty((size, size, 3))

    def paint(mask, colour, alpha=1.0):
        img[mask] = (1 - alpha) * img[mask] + alpha * np.asarray(colour, dtype=np.float64)

    def ellipse(cx, cy, rx, ry):
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0

    # background (Attractive: brighter studio light) and shirt (Male: blue, else pink)
    img[:] = np.array([0.35, 0.4, 0.5]) * (1.35 if a["Attractive"] else 1.0) * jitter
    rx = 0.46 + (0.08 if a["Chubby"] else 0.0) - (0.04 if a["Oval_Face"] else 0.0)
    ry = 0.58 + (0.08 if a["Oval_Face"] else 0.0)
    fy = 0.02
    paint(y > 0.8, (0.2, 0.3, 0.75) if a["Male"] else (0.9, 0.55, 0.7))
    skin = np.array([0.97, 0.88, 0.82]) if a["Pale_Skin"] else np.array([0.86, 0.66, 0.52]) * jitter
    if not a["Young"]:
        skin = skin * 0.92
    skin = np.clip(skin, 0, 1)
    hair_set = [c for name, c in _HAIR_COLOURS.items() if a[name]]
    hair = np.mean(hair_set, axis=0) if hair_set else np.array([0.6, 0.25, 0.1])

    # hair behind the head (Straight: long panels with strands, Wavy: wave texture), neck, face, double chin
    back = ellipse(0, fy - 0.05, rx + 0.1, ry + 0.08) & (y < 0.35)
    paint(back, hair)
    if a["Straight_Hair"]:  # long straight panels down to the shoulders, with vertical strands
        panels = (np.abs(x) > rx - 0.02) & (np.abs(x) < rx + 0.16) & (y > -0.1) & (y < 0.75)
        paint(panels, hair)
        paint(panels & (np.floor((x + 1) * 10) % 2 == 0), hair * 0.7 + 0.05)
    if a["Wavy_Hair"]:
        paint(back & (np.sin(y * 25 + 6 * np.sin(x * 12)) > 0.5), hair * 0.5 + 0.3)
    paint((np.abs(x) < 0.18) & (y > fy) & (y < 0.85), skin * 0.9)
    face = ellipse(0, fy, rx, ry)
    paint(face, skin)
    if a["Double_Chin"]:
        paint(ellipse(0, fy + ry - 0.02, 0.22, 0.09) & ~face, skin * 0.8)
        paint(ellipse(0, fy + ry - 0.08, 0.2, 0.025), skin * 0.75)
    if a["High_Cheekbones"]:
        paint(ellipse(-0.31, 0.14, 0.1, 0.05) | ellipse(0.31, 0.14, 0.1, 0.05), (1.0, 0.97, 0.92), 0.7)
    if a["Rosy_Cheeks"]:
        paint(ellipse(-0.27, 0.26, 0.09, 0.06) | ellipse(0.27, 0.26, 0.09, 0.06), (0.95, 0.35, 0.4), 0.7)
    jaw = face & (y > 0.26)
    if not a["No_Beard"]:
        paint(jaw, hair * 0.8, 0.85)
    if a["5_o_Clock_Shadow"]:
        stubble = (
            face & (y > 0.18) & (np.abs(x) > 0.15) & ((np.arange(size)[None, :] + np.arange(size)[:, None]) % 2 == 0)
        )
        paint(stubble, (0.3, 0.3, 0.35), 0.5)
    if a["Sideburns"]:
        paint(face & (np.abs(x) > rx - 0.1) & (y > -0.2) & (y < 0.2), hair * 0.9)

    # top of the head: hair above the hairline, bald dome, receding temples, bangs, hat
    top = ellipse(0, fy - 0.04, rx + 0.06, ry + 0.06) & (y < -0.33)
    paint(top, np.clip(skin * 1.12, 0, 1) if a["Bald"] else hair)
    if a["Receding_Hairline"]:
        paint(top & (y > -0.5) & (np.abs(x) < 0.3), skin * 0.97)
    if a["Bangs"]:
        paint(face & (y > -0.36) & (y < -0.21) & (np.abs(x) < 0.36), hair * 0.95)
    if a["Wearing_Hat"]:
        paint((y < -0.58) & (np.abs(x) < rx + 0.02), (0.55, 0.1, 0.12))
        paint((y >= -0.6) & (y < -0.53) & (np.abs(x) < rx + 0.14), (0.4, 0.05, 0.08))

    # eyes: makeup, whites, pupils, bags, brows, glasses, crow's feet (not Young)
    for side in (-1, 1):
        ex = side * 0.2
        if a["Heavy_Makeup"]:
            paint(ellipse(ex, -0.1, 0.12, 0.05), (0.55, 0.3, 0.65), 0.8)
        eye = ellipse(ex, -0.04, 0.09, 0.025 if a["Narrow_Eyes"] else 0.05)
        paint(eye, (0.97, 0.97, 0.97))
        paint(eye & ellipse(ex, -0.04, 0.035, 0.035), (0.1, 0.1, 0.2))
        if a["Bags_Under_Eyes"]:
            paint(ellipse(ex, 0.04, 0.08, 0.025) & ~eye, skin * 0.65)
        u = (x - ex) / 0.12
        arch = -0.17 - (0.08 * np.clip(1 - u**2, 0, 1) if a["Arched_Eyebrows"] else 0.0)
        brow = (np.abs(u) < 1) & (np.abs(y - arch) < (0.06 if a["Bushy_Eyebrows"] else 0.02))
        paint(brow, hair * 0.5 + np.array([0.15, 0.1, 0.08]))
        if a["Eyeglasses"]:
            r = np.hypot(x - ex, y + 0.04)
            paint((r > 0.12) & (r < 0.15), (0.05, 0.05, 0.05))
        if not a["Young"]:
            for k in (-1, 0, 1):
                paint((np.abs(x - side * 0.37) < 0.03) & (np.abs(y + 0.04 - k * 0.045) < 0.012), skin * 0.6)
    if a["Eyeglasses"]:
        paint((np.abs(x) < 0.08) & (np.abs(y + 0.04) < 0.015), (0.05, 0.05, 0.05))

    # nose, mustache, mouth (lipstick, big lips, smile curve, open), goatee
    big = a["Big_Nose"]
    paint(ellipse(0, 0.13, 0.09 if big else 0.05, 0.13 if big else 0.09), skin * 0.85)
    if a["Pointy_Nose"]:
        paint((y > 0.0) & (y < 0.22) & (np.abs(x) < 0.04 * (y - 0.0) / 0.22), skin * 0.55)
    if a["Mustache"]:
        paint((np.abs(x) < 0.17) & (np.abs(y - 0.28) < 0.03), hair * 0.55)
    mouth_y = 0.38 - (0.07 * np.clip(x / 0.19, -1, 1) ** 2 if a["Smiling"] else 0.0)
    lips = (np.abs(x) < 0.19) & (np.abs(y - mouth_y) < (0.07 if a["Big_Lips"] else 0.04))
    paint(lips, (0.85, 0.05, 0.15) if a["Wearing_Lipstick"] else (0.7, 0.4, 0.38))
    if a["Mouth_Slightly_Open"]:
        paint((np.abs(x) < 0.13) & (np.abs(y - mouth_y) < 0.025), (0.15, 0.02, 0.05))
    if a["Goatee"]:
        paint(ellipse(0, 0.5, 0.09, 0.06), hair * 0.6)

    # accessories
    if a["Wearing_Earrings"]:
        paint(ellipse(-(rx + 0.03), 0.15, 0.035, 0.035) | ellipse(rx + 0.03, 0.15, 0.035, 0.035), (1.0, 0.85, 0.1))
    if a["Wearing_Necklace"]:
        r = np.hypot(x / 0.22, (y - 0.62) / 0.2)
        paint((r > 0.95) & (r < 1.2) & (y > 0.62), (1.0, 0.85, 0.2))
    if a["Wearing_Necktie"]:
        paint((y > 0.82) & (np.abs(x) < 0.03 + 0.4 * (y - 0.82)), (0.1, 0.1, 0.35))

    img = np.clip(img + rng.normal(0.0, 0.01, img.shape), 0.0, 1.0)
    if a["Blurry"]:
        img = _blur(img)
    return np.round(img * 255).astype(np.uint8)


MIN_SIZE = 16  # the smallest image side generate() accepts (the only check of it)


def generate(
    out_dir,
    n: int,
    size: int = 64,
    *,
    seed: int = 0,
    samples_per_shard: int = 1000,
    splits=(("train", 0.8), ("val", 0.1), ("test", 0.1)),
    overwrite: bool = False,
    label_fraction: float = 1.0,
) -> dict:
    """Write ``n`` synthetic faces as CelebA shards + ``manifest.json`` in ``out_dir``; return the manifest.

    ``out_dir`` must be empty or new; ``overwrite=True`` first deletes an earlier shard set there
    (:func:`~l2b_fast.data.shards.prepare_output_dir`).

    Keys are image stems ``000001``, ``000002``... numbered across splits like CelebA's list_eval_partition;
    members: ``png`` (uint8 RGB), ``attr.json`` ({"attributes": [40 ints 0/1]}), ``json``
    ({"image": "000001.png", "split": split}). Sample i uses ``np.random.default_rng([seed, i])``.

    ``label_fraction`` < 1: each face keeps each attribute's label with that probability (at least one), drawn
    from ``np.random.default_rng([seed, i, 1])`` (the images do not change); it gets a ``labels.json`` member
    (the kept attribute names), its other attributes are written as 0 in ``attr.json``, and each split's
    manifest entry counts the labels per attribute (``"labels"``).
    """
    label_fraction = check_label_fraction(label_fraction)
    if n < 0:
        raise ValueError(f"need n >= 0 samples, got {n}")
    if size < MIN_SIZE:
        raise ValueError(f"image size {size} is too small: synthetic faces need a size >= {MIN_SIZE}")
    parts = split_counts(n, splits)
    prepare_output_dir(out_dir, overwrite=overwrite)
    entries, start = {}, 1
    for split, count in parts:
        kept_labels: list[list[str]] = []

        def samples(split=split, first=start, count=count, kept_labels=kept_labels):
            for index in range(first, first + count):
                rng = np.random.default_rng([seed, index])
                attrs = sample_attributes(rng)
                stem = f"{index:06d}"
                sample = {
                    "__key__": stem,
                    "png": encode_png(render_face(attrs, size, rng), compress_level=1),
                    "json": {"image": f"{stem}.png", "split": split},
                }
                labels = list(ATTRIBUTES)
                if label_fraction < 1.0:
                    labels = sample_labels(ATTRIBUTES, label_fraction, np.random.default_rng([seed, index, 1]))
                    attrs = np.where(np.isin(ATTRIBUTES, labels), attrs, 0)  # no unlabelled value leaks
                    sample[LABELS_MEMBER] = labels
                kept_labels.append(labels)
                yield {**sample, "attr.json": {"attributes": [int(v) for v in attrs]}}

        entries[split] = write_split(samples(), out_dir, split, samples_per_shard=samples_per_shard)
        entries[split]["labels"] = count_labels(ATTRIBUTES, kept_labels)
        start += count
    return write_manifest(
        out_dir,
        "celeba",
        size,
        entries,
        seed,
        created_by="l2b_fast.datasets.celeba.synthetic",
        synthetic=True,
        attributes=list(ATTRIBUTES),
        label_fraction=label_fraction,
    )
