"""forvalue's own image-to-text example dataset: coloured shapes, captioned in a few styles, with optional noise.

Every image is one coloured shape (circle, square, triangle, diamond, cross) on a light background, with
its size and position jittered. Each class is a caption style (a short phrase, a sentence, JSON, tags, ...):
a row's prompt asks for that style and its response captions the image in it, so a good valuation method
ranks training rows of the same style highest. With `noise` > 0 some training rows get a caption of
another shape and colour than their image shows (a flipped label: clean=False), which only the image
reveals: the target of mislabeled-data detection (`noise=0.5` flips half of them).

Images are written as PNG files into a folder beside the JSONL file and referenced by relative path,
which is how forvalue's readers take images (data.py). Everything here is generated; nothing is derived
from other datasets.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forvalue.indexer.data import write_jsonl
from forvalue.indexer.files import write_atomic

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 180), "yellow": (230, 200, 20),
           "purple": (148, 103, 189), "orange": (255, 127, 14)}
BACKGROUNDS = ((255, 255, 255), (240, 240, 240), (250, 244, 230), (235, 242, 250))


@dataclass(frozen=True)
class Style:
    """One class of the dataset: its label, the prompt asking for the style, and the caption."""

    label: str
    prompt: str
    caption: Callable[[str, str], str]  # (shape, colour) → response


STYLES: tuple[Style, ...] = (
    Style("short", "Name the shape and its colour in a few words.", lambda s, c: f" a {c} {s}"),
    Style("sentence", "Describe the image in one sentence.",
          lambda s, c: f" The picture shows a {c} {s} on a plain background."),
    Style("json", "Describe the image as JSON with the keys shape and color.",
          lambda s, c: f' {{"shape": "{s}", "color": "{c}"}}'),
    Style("question", "What shape is in the image, and what colour is it?",
          lambda s, c: f" It is a {s}, and it is {c}."),
    Style("tags", "Give two hashtags for the image.", lambda s, c: f" #{c} #{s}"),
    Style("fields", "List the colour and the shape of the object.", lambda s, c: f" colour: {c}; shape: {s}"),
)


def draw_shape(shape: str, colour: str, size: int, rng: random.Random) -> Any:
    """An RGB `PIL.Image` of `size`² pixels: one `shape` in `colour`, jittered in size and position."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    d = ImageDraw.Draw(img)
    r = size * rng.uniform(0.22, 0.36)
    cx = rng.uniform(r + 1, size - r - 1)
    cy = rng.uniform(r + 1, size - r - 1)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r * math.sqrt(3) / 2, cy + r / 2), (cx - r * math.sqrt(3) / 2, cy + r / 2)],
                  fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")
    return img


def make_shapes_dataset(
    n_classes: int = 6,
    n_train_per_class: int = 15,
    n_test_per_class: int = 3,
    noise: float = 0.0,
    seed: int = 0,
    image_size: int = 64,
) -> list[tuple[dict[str, Any], Any]]:
    """Generate the shapes dataset as (JSON-able row without its image path, PIL image) pairs.

    Classes are the first `n_classes` of `STYLES`. Each row draws a shape and a colour at random and its
    own jittered image; rows: all train rows (class by class), then all test rows. With noise > 0,
    floor(noise · n_train + 0.5) training rows, drawn at random, are captioned with another shape and
    another colour than their image shows; they keep their label and prompt and have clean=False.

    Args:
        n_classes: number of caption styles, 1 to len(STYLES).
        n_train_per_class, n_test_per_class: rows per class (>= 1).
        noise: share of mislabeled training rows, in [0, 1].
        seed: the only source of randomness; the same arguments give the same rows and images.
        image_size: side of the square images in pixels (16 to 1024).

    Returns:
        Rows with id ("train/<style>/<k>" or "test/<style>/<k>"), prompt, response, label, split, clean,
        shape and color (what the image shows), each with its image.

    Raises:
        ValueError: an argument is out of range.
    """
    if not 1 <= n_classes <= len(STYLES):
        raise ValueError(f"n_classes must be between 1 and {len(STYLES)}, got {n_classes}")
    if n_train_per_class < 1 or n_test_per_class < 1:
        raise ValueError(f"need at least one train and one test row per class, got {n_train_per_class} "
                         f"and {n_test_per_class}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    if not 16 <= image_size <= 1024:
        raise ValueError(f"image_size must be between 16 and 1024 pixels, got {image_size}")
    rng = random.Random(seed)
    n_train = n_classes * n_train_per_class
    noisy = set(rng.sample(range(n_train), math.floor(noise * n_train + 0.5)))  # half up
    colours = sorted(COLOURS)
    out = []
    for split, per_class in (("train", n_train_per_class), ("test", n_test_per_class)):
        for c, style in enumerate(STYLES[:n_classes]):
            for k in range(per_class):
                shape, colour = rng.choice(SHAPES), rng.choice(colours)
                img = draw_shape(shape, colour, image_size, rng)
                said_shape, said_colour = shape, colour
                clean = not (split == "train" and c * n_train_per_class + k in noisy)
                if not clean:
                    said_shape = rng.choice([s for s in SHAPES if s != shape])
                    said_colour = rng.choice([x for x in colours if x != colour])
                row = {"id": f"{split}/{style.label}/{k}", "prompt": style.prompt,
                       "response": style.caption(said_shape, said_colour), "label": style.label, "split": split,
                       "clean": clean, "shape": shape, "color": colour}
                out.append((row, img))
    return out


def write_shapes_example(path: str | os.PathLike[str], **kw: Any) -> int:
    """Write `make_shapes_dataset(**kw)`: PNGs into `<stem>_images/` beside `path`, then the JSONL (atomically),
    each row's `image` the relative path of its PNG. Returns the number of rows."""
    p = Path(path)
    folder = p.parent / f"{p.stem}_images"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for row, img in make_shapes_dataset(**kw):
        name = row["id"].replace("/", "_") + ".png"

        def save(fh, img=img) -> None:
            img.save(fh, format="PNG")

        write_atomic(folder / name, save, make_parents=True)
        rows.append({**row, "image": f"{folder.name}/{name}"})
    return write_jsonl(p, rows)
