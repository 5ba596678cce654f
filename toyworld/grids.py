"""Sample grids a person reads: one row per method, its name written at the left, the prompt as the title,
the same seed in each column. Every toy-world benchmark draws its pictures with this."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

FONT_SIZE = 14
PAD = 6


def labelled_grid(rows: dict[str, torch.Tensor], columns: int, title: str, scale: int = 4) -> Image.Image:
    """``rows``: row label -> images [n, H, W, 3] in [0, 1] (n >= ``columns``); each image in a cell of the
    largest one's size, scaled ``scale`` times (nearest: the toy world's pixels stay visible)."""
    font = ImageFont.load_default(size=FONT_SIZE)
    h = max(images.shape[1] for images in rows.values()) + 2
    w = max(images.shape[2] for images in rows.values()) + 2
    cells = np.full((h * len(rows), w * columns, 3), 255, np.uint8)
    for r, images in enumerate(rows.values()):
        for c in range(columns):
            image = (images[c].clamp(0, 1).numpy() * 255).astype(np.uint8)
            cells[r * h + 1:r * h + 1 + image.shape[0], c * w + 1:c * w + 1 + image.shape[1]] = image
    cells_image = Image.fromarray(cells).resize((cells.shape[1] * scale, cells.shape[0] * scale), Image.NEAREST)
    measure = ImageDraw.Draw(cells_image)
    label_width = max(measure.textlength(label, font=font) for label in rows) + 2 * PAD
    title_height = FONT_SIZE + 2 * PAD
    grid = Image.new("RGB", (int(label_width) + cells_image.width, title_height + cells_image.height), "white")
    grid.paste(cells_image, (int(label_width), title_height))
    draw = ImageDraw.Draw(grid)
    draw.text((PAD, PAD), title, fill="black", font=font)
    for r, label in enumerate(rows):
        middle = title_height + (r + 0.5) * h * scale
        draw.text((PAD, middle), label, fill="black", font=font, anchor="lm")
    return grid
