"""Concept masks from pass-1 attention maps.

Each concept's class-word attention is a soft, blurry map. Blending needs masks that
are *exclusive*: at every pixel they sum to at most 1, so an overlap (two characters
hugging) goes to one concept — the one with the stronger evidence — instead of mixing
two LoRAs' noise there. The steps: upsample to latent size, normalise, threshold each
map at its own Otsu level, split same-word groups into instances, dilate, resolve
overlaps, feather. Feathering is a normalised linear filter: applied to disjoint
indicator masks it keeps their sum ≤ 1 (a final renormalisation absorbs rounding).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

LATENT_SCALE = 8
"""Image pixels per latent pixel (the VAE's factor): dilation and feather are given in image pixels."""

ORDERS = ("left_to_right", "attention")


@dataclass
class MaskResult:
    masks: torch.Tensor
    """[k, H, W] in [0, 1]; Σ over k ≤ 1 at every pixel."""
    empty: list[int] = field(default_factory=list)
    """Concepts whose mask came out empty: reported, never silently dropped."""
    labels: list[str] | None = None

    def warnings(self) -> list[str]:
        name = lambda j: f"concept {j + 1}" + (f" ({self.labels[j]!r})" if self.labels else "")  # noqa: E731
        return [f"{name(j)}: empty mask, the concept was not found in the layout" for j in self.empty]


def normalize_map(m: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1]; a constant map has no evidence anywhere and becomes zeros."""
    lo, hi = m.min(), m.max()
    return torch.zeros_like(m) if hi - lo <= 1e-12 else (m - lo) / (hi - lo)


def otsu_threshold(m: torch.Tensor, bins: int = 64) -> float:
    """The threshold that best separates a [0, 1] map into two classes (Otsu)."""
    hist = torch.histc(m.float(), bins=bins, min=0.0, max=1.0)
    centres = (torch.arange(bins, dtype=torch.float32) + 0.5) / bins
    w0 = hist.cumsum(0)
    w1 = hist.sum() - w0
    mu0 = (hist * centres).cumsum(0) / w0.clamp(min=1e-12)
    mu1 = ((hist * centres).sum() - (hist * centres).cumsum(0)) / w1.clamp(min=1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float((torch.argmax(between[:-1]) + 1) / bins)


def connected_components(binary: torch.Tensor) -> tuple[torch.Tensor, int]:
    """8-connected labels (0 = background, 1..n) by max-pool label propagation."""
    h, w = binary.shape
    fg = binary.bool()
    labels = torch.where(fg, torch.arange(1, h * w + 1, dtype=torch.float32).view(h, w), torch.zeros(h, w))
    while True:
        grown = F.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0] * fg
        if torch.equal(grown, labels):
            break
        labels = grown
    values = labels[fg].unique()
    remap = torch.zeros(h * w + 1)
    remap[values.long()] = torch.arange(1, len(values) + 1, dtype=torch.float32)
    return remap[labels.long()].long(), len(values)


def dilate(binary: torch.Tensor, radius: int) -> torch.Tensor:
    """Grow a binary mask by ``radius`` pixels (square neighbourhood)."""
    if radius <= 0:
        return binary
    return F.max_pool2d(binary[None, None].float(), 2 * radius + 1, stride=1, padding=radius)[0, 0]


def feather_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Soften edges with a normalised Gaussian (sigma = radius / 2), replicate padding."""
    if radius <= 0:
        return mask
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / (radius / 2)) ** 2)
    kernel = kernel / kernel.sum()
    m = mask[None, None]
    m = F.conv2d(F.pad(m, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return m[0, 0]


def _centroid(region: torch.Tensor) -> tuple[float, float]:
    ys, xs = torch.nonzero(region, as_tuple=True)
    return float(xs.float().mean()), float(ys.float().mean())


def split_instances(evidence: torch.Tensor, n: int, order: str = "left_to_right",
                    own_maps: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Split the shared evidence of ``n`` same-word concepts into ``n`` disjoint regions.

    The ``n`` largest connected components of the thresholded evidence, assigned left to
    right (ties top to bottom), or by overlap with each concept's own map
    (``order="attention"``). With fewer components than concepts, the foreground is cut
    into vertical bands at the quantiles of its mass, so every concept still gets a place.
    """
    binary = evidence > otsu_threshold(evidence)
    labels, count = connected_components(binary)
    if count >= n:
        sizes = torch.bincount(labels.flatten(), minlength=count + 1)[1:]
        keep = (torch.argsort(sizes, descending=True)[:n] + 1).tolist()
        regions = [labels == k for k in keep]
    else:
        cols = (evidence * binary).sum(0).cumsum(0)
        cuts = [int(torch.searchsorted(cols, cols[-1] * q / n)) for q in range(1, n)]
        edges = [0] + cuts + [evidence.shape[1]]
        regions = []
        for a, b in zip(edges[:-1], edges[1:]):
            band = torch.zeros_like(binary)
            band[:, a:max(b, a + 1)] = True
            regions.append(binary & band)
    regions.sort(key=_centroid)
    if order == "attention" and own_maps is not None:
        best = max(itertools.permutations(range(n)),
                   key=lambda p: sum(float((own_maps[j] * regions[p[j]]).sum()) for j in range(n)))
        regions = [regions[p] for p in best]
    return regions


def _cap_sum(masks: torch.Tensor) -> torch.Tensor:
    """Make Σ masks ≤ 1 exactly where rounding pushed it over (by a few ulps at most)."""
    total = masks.sum(0, keepdim=True)
    masks = torch.where(total > 1, masks / total, masks)
    while (over := masks.sum(0, keepdim=True) > 1).any():
        masks = torch.where(over, torch.nextafter(masks, torch.zeros_like(masks)), masks)
    return masks


def _check(maps: torch.Tensor, latent_size, groups, dilation, feather_px, order) -> list[list[int]]:
    if maps.dim() != 3:
        raise ValueError(f"maps must be [concepts, h, w], got shape {tuple(maps.shape)}")
    if len(latent_size) != 2 or min(latent_size) < 1:
        raise ValueError(f"latent_size must be (H, W) with positive sizes, got {latent_size}")
    if dilation < 0 or feather_px < 0:
        raise ValueError(f"dilation and feather must be >= 0 pixels, got {dilation} and {feather_px}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    groups = [list(g) for g in (groups or []) if len(g) > 1]
    seen: set[int] = set()
    for g in groups:
        for j in g:
            if not 0 <= j < maps.shape[0]:
                raise ValueError(f"groups: concept index {j} out of range for {maps.shape[0]} concepts")
            if j in seen:
                raise ValueError(f"groups: concept index {j} is in two groups")
            seen.add(j)
    return groups


def masks_from_attention(maps: torch.Tensor, latent_size: tuple[int, int], *, groups: list[list[int]] | None = None,
                         dilation: int = 0, feather: int = 0, order: str = "left_to_right",
                         labels: list[str] | None = None) -> MaskResult:
    """Exclusive soft masks [k, H, W] for one image from per-concept attention maps [k, h, w]."""
    groups = _check(maps, latent_size, groups, dilation, feather, order)
    up = F.interpolate(maps[None].float().clamp(min=0), size=tuple(latent_size), mode="bilinear", align_corners=False)[0]
    evidence = torch.stack([normalize_map(m) for m in up])
    binary = torch.stack([m > otsu_threshold(m) if m.max() > 0 else torch.zeros_like(m, dtype=torch.bool) for m in evidence])
    for group in groups:
        shared = normalize_map(evidence[group].mean(0))
        regions = split_instances(shared, len(group), order, [evidence[j] for j in group])
        for j, region in zip(group, regions):
            binary[j], evidence[j] = region, shared * region
    grown = torch.stack([dilate(b, round(dilation / LATENT_SCALE)) for b in binary]) > 0
    strength = torch.where(grown, evidence + 1e-6, torch.full_like(evidence, -1.0))  # dilated rim still counts
    winner = strength.argmax(0)
    owned = torch.stack([(winner == j) & grown[j] for j in range(len(maps))]).float()
    soft = torch.stack([feather_mask(m, round(feather / LATENT_SCALE)) for m in owned])
    soft = _cap_sum(soft)
    empty = [j for j in range(len(maps)) if not owned[j].any()]
    return MaskResult(soft, empty, labels)



def overlay(masks: torch.Tensor, image: torch.Tensor | None = None, alpha: float = 0.5) -> torch.Tensor:
    """An RGB [3, H, W] picture of the masks, a colour per concept, over an optional image."""
    palette = torch.tensor([[1.0, 0.2, 0.2], [0.2, 0.5, 1.0], [0.2, 0.9, 0.3], [1.0, 0.8, 0.1], [0.8, 0.3, 1.0]])
    colours = palette[torch.arange(len(masks)) % len(palette)]
    painted = torch.einsum("khw,kc->chw", masks.float(), colours)
    coverage = masks.sum(0, keepdim=True).clamp(max=1)
    base = torch.zeros_like(painted) if image is None else F.interpolate(image[None].float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)[0]
    return base * (1 - alpha * coverage) + alpha * painted
