"""Regions the user gives: boxes drawn on the canvas (JSON text), or a mask image with one colour per concept.

The canvas (``javascript/omg_regions.js``) writes
``{"width": W, "height": H, "boxes": {"1": [x0, y0, x1, y1], ...}}`` in pixels of a
W×H canvas (the image size when drawn); concept numbers are 1-based, as in the UI. A mask
image paints concept n in the n-th colour of the mask overlay's palette
(``PALETTE_RGB``: red, blue, green, yellow, ...); black, white and transparent pixels are
background. An uploaded mask image is turned into the same JSON at 1/8 of its size (the
latent resolution the masks blend at) as run lengths,
``"masks": {"1": "0 12 5 ..."}`` with ``"mask_size": [h, w]``, so the regions travel in
the infotext and the API like every other setting.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy
import torch
import torch.nn.functional as F

from ..engine.masks import _PALETTE

PALETTE_RGB = (_PALETTE * 255).round().to(torch.uint8)
"""Concept n's colour is row n-1, the colour the mask overlay shows it in."""

COLOUR_TOLERANCE = 48
MAX_CANVAS_SIDE = 8192
"""The largest canvas side a request may give (the WebUIs' images stop at 2048 in the UI, 8192
via the API); beyond it a mask (a bool per pixel) would be a decompression bomb of run lengths."""
"""Largest per-channel distance at which a pixel still counts as a palette colour (JPEG, antialiasing)."""


@dataclass
class Regions:
    """The user's regions: boxes in pixels of a ``canvas_hw`` canvas, and/or bool masks by concept index."""

    canvas_hw: tuple[int, int]
    boxes: dict[int, tuple[float, float, float, float]] = field(default_factory=dict)
    masks: dict[int, torch.Tensor] = field(default_factory=dict)


def cropped(regions: Regions, frame_wh: tuple[int, int], crop: tuple[int, int, int, int]) -> Regions:
    """The regions drawn over a whole picture (``frame_wh``: its width and height; the canvas stands for all of
    it) as seen inside ``crop`` (x, y, width, height in the picture's pixels): what inpainting's "only masked"
    samples, scaled up to the job's size. A region with nothing inside the crop is dropped."""
    (fw, fh), (x, y, w, h) = frame_wh, crop
    sx, sy = fw / regions.canvas_hw[1], fh / regions.canvas_hw[0]
    inside = Regions((h, w))
    for j, (x0, y0, x1, y1) in regions.boxes.items():
        box = (min(max(x0 * sx - x, 0), w), min(max(y0 * sy - y, 0), h), min(max(x1 * sx - x, 0), w), min(max(y1 * sy - y, 0), h))
        if box[2] > box[0] and box[3] > box[1]:
            inside.boxes[j] = box
    for j, mask in regions.masks.items():
        (mh, mw), top, left = mask.shape, round(y * mask.shape[0] / fh), round(x * mask.shape[1] / fw)
        part = mask[top:max(round((y + h) * mh / fh), top + 1), left:max(round((x + w) * mw / fw), left + 1)]
        if bool(part.any()):
            inside.masks[j] = part
    return inside


def parse_regions(text: str, concepts: int) -> Regions:
    """The regions in the canvas's JSON; ValueError naming the problem."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"OMG regions: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("boxes", {}), dict) or not isinstance(data.get("masks", {}), dict):
        raise ValueError('OMG regions: expected {"width": W, "height": H, "boxes": {"1": [x0, y0, x1, y1]}}')
    width, height = data.get("width"), data.get("height")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        raise ValueError(f"OMG regions: width and height must be positive numbers, got {width!r} and {height!r}")
    if max(width, height) > MAX_CANVAS_SIDE:
        raise ValueError(f"OMG regions: the canvas is {width}x{height}; at most {MAX_CANVAS_SIDE} pixels a side")
    regions = Regions((int(height), int(width)))
    for key, box in data.get("boxes", {}).items():
        j = _concept(key, concepts)
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise ValueError(f"OMG regions: concept {key}'s box must be [x0, y0, x1, y1], got {box!r}")
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"OMG regions: concept {key}'s box {box} is empty or outside the {width}x{height} canvas")
        regions.boxes[j] = (float(x0), float(y0), float(x1), float(y1))
    if data.get("masks"):
        size = data.get("mask_size")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise ValueError(f"OMG regions: mask_size must be [h, w], got {size!r}")
        if size[0] > height or size[1] > width:
            raise ValueError(f"OMG regions: mask_size {size} is larger than the {width}x{height} canvas")
        for key, runs in data["masks"].items():
            regions.masks[_concept(key, concepts)] = decode_runs(runs, tuple(size), key)
    return regions


def _concept(key, concepts: int) -> int:
    if not str(key).isdigit() or not 1 <= int(key) <= concepts:
        raise ValueError(f"OMG regions: {key!r} is not a concept number (1 to {concepts})")
    return int(key) - 1


def encode_runs(mask: torch.Tensor) -> str:
    """Run lengths of a bool mask, row-major, starting with a (possibly empty) run of False."""
    flat = mask.flatten().tolist()
    runs, current, length = [], False, 0
    for value in flat:
        if value != current:
            runs.append(length)
            current, length = value, 0
        length += 1
    runs.append(length)
    return " ".join(map(str, runs))


def decode_runs(runs: str, size: tuple[int, int], key="?") -> torch.Tensor:
    try:
        lengths = [int(v) for v in str(runs).split()]
    except ValueError:
        raise ValueError(f"OMG regions: concept {key}'s mask is not a list of run lengths") from None
    if any(v < 0 for v in lengths) or sum(lengths) != size[0] * size[1]:
        raise ValueError(f"OMG regions: concept {key}'s mask does not cover {size[0]}x{size[1]} pixels")
    values = torch.tensor([i % 2 == 1 for i in range(len(lengths))])
    return values.repeat_interleave(torch.tensor(lengths, dtype=torch.long)).view(size)


def regions_from_image(image: numpy.ndarray, concepts: int) -> str:
    """An uploaded mask image as the regions JSON (masks at 1/8 of its size)."""
    masks = masks_from_image(image, concepts)
    h, w = masks.shape[-2:]
    small = resize_masks(masks, (max(1, h // 8), max(1, w // 8)))
    return json.dumps({"width": int(w), "height": int(h), "mask_size": list(small.shape[-2:]),
                       "masks": {str(j + 1): encode_runs(m) for j, m in enumerate(small) if bool(m.any())}})


def scale_box(box, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> tuple[float, float, float, float]:
    """A box in pixels of one size, in pixels of another (the canvas vs the image)."""
    sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def box_mask(box, hw: tuple[int, int], canvas_hw: tuple[int, int]) -> torch.Tensor:
    """A bool [H, W] mask, True where a pixel's centre lies in ``box`` (given in canvas pixels)."""
    x0, y0, x1, y1 = scale_box(box, canvas_hw, hw)
    ys = torch.arange(hw[0]).float() + 0.5
    xs = torch.arange(hw[1]).float() + 0.5
    return ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]


def masks_from_image(image: numpy.ndarray, concepts: int) -> torch.Tensor:
    """Per-concept bool masks [k, H, W] from an RGB(A) mask image; ValueError naming a colour that fits no concept."""
    array = numpy.asarray(image)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"OMG mask image: expected an RGB or RGBA image, got an array of shape {array.shape}")
    pixels = torch.from_numpy(array[..., :3].astype(numpy.int16))
    background = (pixels.max(-1).values < COLOUR_TOLERANCE) | (pixels.min(-1).values > 255 - COLOUR_TOLERANCE)
    if array.shape[2] == 4:
        background |= torch.from_numpy(array[..., 3] < 128)
    palette = PALETTE_RGB[:concepts].to(torch.int16)
    distance = (pixels[None] - palette[:, None, None]).abs().max(-1).values  # [k, H, W]
    nearest = distance.min(0)
    unknown = ~background & (nearest.values > COLOUR_TOLERANCE)
    if bool(unknown.any()):
        y, x = map(int, torch.nonzero(unknown)[0])
        raise ValueError(f"OMG mask image: colour {tuple(int(c) for c in pixels[y, x])} at ({x}, {y}) is not one of "
                         f"the first {concepts} concept colours {[tuple(c.tolist()) for c in palette]}")
    return torch.stack([(nearest.indices == j) & ~background for j in range(concepts)])


def resize_masks(masks: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bool masks [k, h, w] at another size (area-weighted, a pixel is in when half of it is)."""
    if tuple(masks.shape[-2:]) == tuple(hw):
        return masks.bool()
    return F.interpolate(masks[None].float(), size=hw, mode="area" if masks.shape[-1] >= hw[1] else "nearest")[0] >= 0.5
