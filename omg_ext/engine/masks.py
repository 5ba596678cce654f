"""Concept masks from pass-1 attention maps.

Each concept's class-word attention is a soft, blurry map. Pass 2 blends the UNet
outputs as ``(1 - Σ M_i)·global + Σ M_i·concept_i``, so the masks must be *exclusive*:
at every pixel they sum to at most 1. Where two characters overlap (hugging, one in
front of the other) the pixel goes to ONE concept — the one with the stronger
evidence — instead of summing two LoRAs' predictions there.

Steps (:func:`masks_from_attention`): upsample each map to latent size, normalise it,
split same-word groups ("a man and a man") into instances, threshold each map at its
own Otsu level, dilate, give every pixel to a single owner, feather. Feathering is a
normalised linear filter: applied to disjoint indicator masks it keeps their sum ≤ 1;
a final pass absorbs float rounding so the invariant holds exactly.

Everything is plain torch (no scipy / OpenCV) and works on any device.
"""
from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

LATENT_SCALE = 8
"""Image pixels per latent pixel (the VAE's factor): dilation and feather are given in image pixels."""

ORDERS = ("left_to_right", "attention")
"""How same-word concepts get their instances: by position, or by each concept's own attention."""

ATTENTION_MARGIN = 0.05
"""order="attention" leaves the left-to-right assignment only when another one explains the
concepts' own maps better by more than this fraction (near-identical maps carry no signal)."""

MIN_INSTANCE_FRACTION = 0.05
"""A connected component smaller than this fraction of the largest is noise, not an instance."""

_PALETTE = torch.tensor([
    [1.00, 0.25, 0.25], [0.20, 0.50, 1.00], [0.25, 0.85, 0.30], [1.00, 0.80, 0.10],
    [0.75, 0.30, 1.00], [0.10, 0.85, 0.85], [1.00, 0.50, 0.80], [0.60, 0.40, 0.20],
])


@dataclass
class MaskResult:
    """Masks for one image, plus what went wrong so the user can be told."""

    masks: torch.Tensor
    """[k, H, W] float32 in [0, 1]; Σ over k ≤ 1 at every pixel (exactly, not up to rounding)."""
    empty: list[int] = field(default_factory=list)
    """Concepts whose mask came out empty: reported, never silently dropped (their mask is all zero)."""
    labels: list[str] | None = None
    """Optional concept names (e.g. class words) used in :meth:`warnings`."""
    notes: list[str] = field(default_factory=list)
    """Other things a user should know, e.g. that touching figures were split into bands."""
    sources: list[str] = field(default_factory=list)
    """Per concept, the mask source actually used (e.g. "sam", "attention"); for the infotext."""

    def name(self, j: int) -> str:
        """A concept as users count it (1-based) with its label, e.g. "concept 2 ('woman')"."""
        return concept_name(j, self.labels)

    def warnings(self) -> list[str]:
        """Human-readable problems, one line each (empty masks first, then notes)."""
        return [f"{self.name(j)}: empty mask, the concept was not found in the layout" for j in self.empty] + list(self.notes)


def concept_name(j: int, labels: list[str] | None) -> str:
    label = labels[j] if labels is not None and j < len(labels) else None
    return f"concept {j + 1}" + (f" ({label!r})" if label else "")


# -- maps -------------------------------------------------------------------------------------------------------------

def latent_radius(pixels: int) -> int:
    """Image pixels -> latent pixels, rounding halves up (4 px -> 1, 12 px -> 2), so 8·r px is r latent px."""
    return int(math.floor(pixels / LATENT_SCALE + 0.5))


def normalize_map(m: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1], so maps of different concepts and layers compare on one scale.

    A constant map (all zero included) carries no evidence anywhere and becomes zeros.
    """
    m = m.float()
    lo, hi = m.min(), m.max()
    if not bool(hi - lo > 1e-12):
        return torch.zeros_like(m)
    return ((m - lo) / (hi - lo)).clamp(0.0, 1.0)


def otsu_threshold(m: torch.Tensor, bins: int = 64) -> float:
    """Otsu's threshold of a [0, 1] map: the cut that best separates it into two classes.

    A fixed threshold fails because attention strength varies per concept, prompt and
    model; Otsu adapts to each map. Returned as a bin edge in (0, 1): for a normalised
    non-constant map the maximum (1.0) is always above it, so the foreground is never
    empty. When several cuts separate equally well (a gap between two modes), the middle
    of the gap is returned.
    """
    hist = torch.histc(m.detach().float().flatten().cpu(), bins=bins, min=0.0, max=1.0).double()
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    w0 = hist.cumsum(0)[:-1]
    w1 = hist.sum() - w0
    m0 = (hist * centres).cumsum(0)[:-1]
    mu0 = m0 / w0.clamp(min=1e-12)
    mu1 = ((hist * centres).sum() - m0) / w1.clamp(min=1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2  # cut after bin i, i = 0..bins-2
    best = between.max()
    ties = torch.nonzero(between >= best - 1e-9 * max(float(best), 1.0)).flatten()
    i = (int(ties[0]) + int(ties[-1])) / 2
    return float((i + 1) / bins)


def connected_components(binary: torch.Tensor, connectivity: int = 8) -> tuple[torch.Tensor, int]:
    """Label the connected regions of a [h, w] binary map: (labels [h, w] long, 0 = background, count).

    Pure torch: every foreground pixel starts with its own id; each round takes the max id
    over its neighbours (restricted to the foreground) and then jumps to the id its id's
    pixel holds (pointer jumping, so long snakes converge fast), until nothing changes.
    Labels are numbered 1..count in raster order of each region's LAST pixel (deterministic).
    Fine for maps up to a few hundred pixels a side.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    if binary.dim() != 2:
        raise ValueError(f"binary must be [h, w], got shape {tuple(binary.shape)}")
    h, w = binary.shape
    fg = binary.bool()
    ids = torch.arange(1, h * w + 1, dtype=torch.float64, device=binary.device).view(h, w)
    labels = torch.where(fg, ids, torch.zeros_like(ids))
    while True:
        if connectivity == 8:
            grown = F.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0]
        else:
            p = F.pad(labels, (1, 1, 1, 1))
            grown = torch.stack([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]).amax(0)
        grown = grown * fg
        flat = torch.cat([torch.zeros(1, dtype=grown.dtype, device=grown.device), grown.flatten()])
        jumped = torch.maximum(grown, flat[grown.long()]) * fg  # the id's own pixel may already know a larger id
        if torch.equal(jumped, labels):
            break
        labels = jumped
    values = labels[fg].unique()
    remap = torch.zeros(h * w + 1, dtype=torch.long, device=binary.device)
    remap[values.long()] = torch.arange(1, len(values) + 1, device=binary.device)
    return remap[labels.long()], len(values)


def dilate(binary: torch.Tensor, radius: int, shape: str = "square") -> torch.Tensor:
    """Grow a [h, w] binary mask by ``radius`` pixels, so masks cover the characters' edges
    (attention under-covers hair, hands, clothing). Same dtype out as in; radius 0 returns
    the input itself. ``shape``: "square" (Chebyshev distance, a max-pool) or "disc"
    (Euclidean distance ≤ radius)."""
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if shape not in ("square", "disc"):
        raise ValueError(f"shape must be 'square' or 'disc', got {shape!r}")
    if radius == 0:
        return binary
    x = (binary > 0).float()[None, None]
    if shape == "square":
        out = F.max_pool2d(x, 2 * radius + 1, stride=1, padding=radius)[0, 0] > 0
    else:
        r = torch.arange(-radius, radius + 1, dtype=torch.float32, device=binary.device)
        disc = ((r[:, None] ** 2 + r[None, :] ** 2) <= radius ** 2).float()
        out = F.conv2d(x, disc[None, None], padding=radius)[0, 0] > 0.5
    return out.to(binary.dtype)


def _window_extremes(x: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of every (2r+1)² window of [n, h, w] (out-of-image = nearest edge value)."""
    k = 2 * radius + 1
    hi = F.max_pool2d(x[:, None], k, stride=1, padding=radius)[:, 0]
    lo = -F.max_pool2d(-x[:, None], k, stride=1, padding=radius)[:, 0]
    return lo, hi


def feather(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Soften the edges of a [h, w] (or [n, h, w]) mask with a separable Gaussian, so the
    blend between a concept and the global prediction has no seam.

    sigma = radius / 2, kernel half-width = radius, normalised to sum 1, replicate padding
    (an image border is not an edge). Being linear and normalised, it keeps Σ ≤ 1 for
    masks that partition the image. Where a pixel's whole window is constant the value is
    kept exactly (an owned interior stays exactly 1, the far background exactly 0).
    radius 0 returns the input itself.
    """
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if radius == 0:
        return mask
    squeeze = mask.dim() == 2
    m = (mask[None] if squeeze else mask).float()
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=m.device)
    kernel = torch.exp(-0.5 * (x / (radius / 2)) ** 2)
    kernel = kernel / kernel.sum()
    b = m[:, None]
    b = F.conv2d(F.pad(b, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    b = F.conv2d(F.pad(b, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    lo, hi = _window_extremes(m, radius)
    out = torch.where(lo == hi, m, b[:, 0].clamp(lo, hi))
    return out[0] if squeeze else out


feather_mask = feather
"""Alias: inside :func:`masks_from_attention` the name ``feather`` is the keyword argument."""


# -- instances: same-word concepts, or all concepts split as figures -------------------------------------------------

def _centroid(region: torch.Tensor) -> tuple[float, float]:
    """(x, y) of a region's centre, x first so sorting goes left to right, ties top to bottom."""
    ys, xs = torch.nonzero(region, as_tuple=True)
    if len(xs) == 0:
        return math.inf, math.inf
    return float(xs.float().mean()), float(ys.float().mean())


def _bands(binary: torch.Tensor, evidence: torch.Tensor, n: int, dim: int) -> list[torch.Tensor] | None:
    """Cut the foreground into n bands along ``dim`` (1 = vertical bands over x) at the
    quantiles of its evidence mass, each band holding at least one foreground line;
    None when the foreground spans fewer than n lines."""
    mass = (evidence * binary).sum(dim=1 - dim)  # per column (dim=1) or row (dim=0)
    lines = torch.nonzero(binary.any(dim=1 - dim)).flatten()
    if len(lines) < n:
        return None
    line_mass = mass[lines].double() + 1e-12
    cum = line_mass.cumsum(0)
    mid = (cum - line_mass / 2) / cum[-1]  # each foreground line's position in the mass, 0..1
    # k[i] = foreground lines before band i; strictly increasing, band i non-empty
    k = [0] + [int((mid < i / n).sum()) for i in range(1, n)] + [len(lines)]
    for i in range(1, n):
        k[i] = max(k[i], k[i - 1] + 1)
    for i in range(n - 1, 0, -1):
        k[i] = min(k[i], k[i + 1] - 1)
    band_of_line = torch.full((binary.shape[dim],), -1, dtype=torch.long, device=binary.device)
    for i in range(n):
        band_of_line[lines[k[i]:k[i + 1]]] = i
    band = band_of_line[None, :] if dim == 1 else band_of_line[:, None]
    return [binary & (band == i) for i in range(n)]


def _assign_by_attention(regions: list[torch.Tensor], own_maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Reorder left-to-right regions so concept j gets the region its own map covers most;
    kept left to right unless that beats it by more than ATTENTION_MARGIN."""
    n = len(regions)
    overlap = torch.tensor([[float((own_maps[j].float() * regions[i]).sum()) for i in range(n)] for j in range(n)])
    identity = float(overlap.diagonal().sum())
    if n <= 5:
        best = max(itertools.permutations(range(n)), key=lambda p: sum(float(overlap[j, p[j]]) for j in range(n)))
    else:  # greedy: the strongest concept/region pair first
        best, free_c, free_r = [0] * n, set(range(n)), set(range(n))
        for _ in range(n):
            j, i = max(((j, i) for j in free_c for i in free_r), key=lambda ji: float(overlap[ji]))
            best[j] = i
            free_c.discard(j)
            free_r.discard(i)
    score = sum(float(overlap[j, best[j]]) for j in range(n))
    if score <= identity * (1 + ATTENTION_MARGIN):
        return regions
    return [regions[best[j]] for j in range(n)]


def split_instances(evidence: torch.Tensor, n: int, order: str = "left_to_right",
                    own_maps: list[torch.Tensor] | None = None, *,
                    min_fraction: float = MIN_INSTANCE_FRACTION) -> list[torch.Tensor]:
    """Split the shared evidence [h, w] (in [0, 1]) of ``n`` grouped concepts (sharing one class
    word, or all concepts when masks are split by figures) into ``n`` disjoint bool regions, one
    per concept, in concept order.

    Why: "a man and a man" gives the two "man" tokens near-identical attention covering
    both men, so per-concept thresholds would give each concept both men (and a model whose
    class words do not tell its figures apart does the same for "a man and a woman"). Instead the
    evidence is thresholded (Otsu), its connected components found, and the ``n`` largest
    kept (components smaller than ``min_fraction`` of the largest are noise); they go to
    the concepts left to right by centroid x (ties by y). With fewer components than
    concepts (the instances touch), the foreground is cut into ``n`` vertical bands at the
    x-quantiles of its mass (horizontal bands if it is too narrow), so each concept still
    gets a distinct non-empty region. order="attention": each concept's own map
    (``own_maps``, list of [h, w]) picks the region it overlaps most (best total overlap
    over all assignments, brute force for n ≤ 5, greedy above); the left-to-right
    assignment stays unless the best one beats it by more than ATTENTION_MARGIN.
    A region comes back empty only when the foreground has fewer than n pixels in both
    directions.
    """
    return _split(evidence, n, order, own_maps, min_fraction)[0]


def _split(evidence, n, order, own_maps, min_fraction) -> tuple[list[torch.Tensor], bool]:
    """:func:`split_instances`, also saying whether it had to fall back to bands."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if order == "attention" and (own_maps is None or len(own_maps) != n):
        raise ValueError(f"own_maps: order='attention' needs one map per concept ({n})")
    evidence = evidence.float()
    if not bool(evidence.max() > 0):
        return [torch.zeros_like(evidence, dtype=torch.bool) for _ in range(n)], False
    binary = evidence > otsu_threshold(evidence)
    labels, count = connected_components(binary)
    sizes = torch.bincount(labels.flatten(), minlength=count + 1)[1:]
    big = [int(i) + 1 for i in torch.argsort(sizes, descending=True, stable=True)
           if sizes[i] >= min_fraction * sizes.max()]
    banded = len(big) < n
    if not banded:
        regions = [labels == c for c in big[:n]]
    else:
        binary = torch.isin(labels, torch.tensor(big, device=labels.device))  # specks are not part of anyone
        regions = _bands(binary, evidence, n, dim=1) or _bands(binary, evidence, n, dim=0)
        if regions is None:  # a speck: the first concept gets it, the others are reported empty
            regions = [binary] + [torch.zeros_like(binary) for _ in range(n - 1)]
    regions.sort(key=_centroid)
    if order == "attention":
        regions = _assign_by_attention(regions, own_maps)
    return regions, banded


# -- the masks --------------------------------------------------------------------------------------------------------

def _exact_cap(masks: torch.Tensor) -> torch.Tensor:
    """Make Σ masks ≤ 1 exactly where rounding pushed it over (by a few ulps at most)."""
    if masks.shape[0] == 0:
        return masks
    total = masks.sum(0, keepdim=True)
    masks = torch.where(total > 1, masks / total, masks)
    while bool((over := masks.sum(0, keepdim=True) > 1).any()):
        masks = torch.where(over, torch.nextafter(masks, torch.zeros_like(masks)), masks)
    return masks


def _whole(value) -> int | None:
    """An integer (Python or numpy/torch scalar) as int; None for anything else, bools included."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check(maps, latent_size, groups, dilation, feather_px, order, labels) -> tuple[tuple[int, int], list[list[int]]]:
    """Clear errors naming the bad argument, before any work."""
    if not isinstance(maps, torch.Tensor) or maps.dim() != 3:
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"maps must be [concepts, h, w], got {shape}")
    if maps.shape[1] < 1 or maps.shape[2] < 1:
        raise ValueError(f"maps must have a non-empty h and w, got shape {tuple(maps.shape)}")
    if not bool(torch.isfinite(maps).all()):
        raise ValueError("maps must be finite (found NaN or inf)")
    if bool((maps < 0).any()):
        raise ValueError(f"maps must be non-negative attention (min {float(maps.min()):.3g})")
    try:
        size = tuple(int(s) for s in latent_size)
    except (TypeError, ValueError):
        raise ValueError(f"latent_size must be (H, W), got {latent_size!r}") from None
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"latent_size must be (H, W) with positive sizes, got {latent_size!r}")
    for name, value in (("dilation", dilation), ("feather", feather_px)):
        whole = _whole(value)
        if whole is None or whole < 0:
            raise ValueError(f"{name} must be a whole number of pixels >= 0, got {value!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    k = maps.shape[0]
    if labels is not None and len(labels) != k:
        raise ValueError(f"labels must name every concept: {len(labels)} labels for {k} concepts")
    seen: set[int] = set()
    out = []
    for g in groups or []:
        g = [_whole(j) if _whole(j) is not None else j for j in g]
        for j in g:
            if not isinstance(j, int) or not 0 <= j < k:
                raise ValueError(f"groups: concept index {j!r} out of range for {k} concepts")
            if j in seen:
                raise ValueError(f"groups: concept index {j} is in two groups (or twice in one)")
            seen.add(j)
        if len(g) > 1:
            out.append(g)
    return size, out


def masks_from_attention(maps: torch.Tensor, latent_size: tuple[int, int], *, groups: list[list[int]] | None = None,
                         dilation: int = 0, feather: int = 0, order: str = "left_to_right",
                         labels: list[str] | None = None) -> MaskResult:
    """Exclusive soft masks [k, H, W] for ONE image from per-concept attention maps [k, h, w].

    maps: each concept's class-word attention (non-negative), any resolution.
    latent_size: (H, W) of the latent the masks blend.
    groups: lists of concept indices whose masks are split into instances, e.g. [[0, 1]] for
        "a man and a man" (or all concepts, to split by figures); the instances go to the
        listed concepts left to right or by attention (see :func:`split_instances`).
    dilation, feather: in IMAGE pixels; :func:`latent_radius` converts (8 px = 1 latent px).
        Dilation is square (Chebyshev distance).
    order: "left_to_right" or "attention", for grouped concepts only.
    labels: names for the warnings.

    Ownership: a pixel goes to the concept whose thresholded core is nearest (a core
    beats a dilated rim, a nearer rim beats a farther one, so dilation grows into free
    space without stealing another concept's core); among equally near concepts the
    highest normalised evidence wins, ties to the lower index. For overlapping cores
    that is simply "the stronger evidence wins". A concept that owns no pixel keeps an
    all-zero mask and is listed in ``empty``.
    """
    _check(maps, latent_size, groups, dilation, feather, order, labels)
    binary, evidence, notes = attention_cores(maps, latent_size, groups=groups, order=order, labels=labels)
    return exclusive_masks(binary, evidence, dilation=dilation, feather=feather, labels=labels, notes=notes)


def attention_cores(maps: torch.Tensor, latent_size: tuple[int, int], *, groups: list[list[int]] | None = None,
                    order: str = "left_to_right", labels: list[str] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Each concept's core (Otsu-thresholded attention, grouped concepts split into instances) [k, H, W] bool,
    its evidence [k, H, W] in [0, 1], and notes; :func:`exclusive_masks` turns them into masks.
    Other mask sources start from these too and replace the cores they can place."""
    size, groups = _check(maps, latent_size, groups, 0, 0, order, labels)
    k = maps.shape[0]
    if k == 0:
        return torch.zeros(0, *size, dtype=torch.bool, device=maps.device), torch.zeros(0, *size, device=maps.device), []
    up = F.interpolate(maps[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    evidence = torch.stack([normalize_map(m) for m in up])
    binary = torch.stack([m > otsu_threshold(m) if bool(m.max() > 0) else torch.zeros_like(m, dtype=torch.bool)
                          for m in evidence])
    notes = []
    for group in groups:
        group = [j for j in group if bool(evidence[j].max() > 0)]  # a concept without a map here has no figure
        if len(group) < 2:
            continue
        shared = normalize_map(evidence[group].mean(0))
        regions, banded = _split(shared, len(group), order, [evidence[j] for j in group], MIN_INSTANCE_FRACTION)
        if banded and (labels is None or len({labels[j].strip().lower() for j in group}) == 1):
            # touching figures of different words are banded by design (``mask_split`` "figures"): no news
            names = ", ".join(concept_name(j, labels) for j in group)
            notes.append(f"{names}: one region for {len(group)} same-word instances, split into bands left to right")
        for j, region in zip(group, regions):
            binary[j], evidence[j] = region, shared * region
    return binary, evidence, notes


def exclusive_masks(binary: torch.Tensor, evidence: torch.Tensor, *, dilation: int = 0, feather: int = 0,
                    labels: list[str] | None = None, notes: list[str] | None = None) -> MaskResult:
    """Exclusive soft masks from per-concept cores ``binary`` [k, H, W] (bool, latent resolution).

    ``evidence`` [k, H, W] in [0, 1] breaks ties between equally near concepts. Used for
    every mask source: attention cores, SAM masks, drawn regions.
    """
    k = binary.shape[0]
    evidence = evidence.float()
    # Chebyshev distance to each concept's core, up to the dilation radius (inf beyond).
    radius = latent_radius(_whole(dilation))
    distance = torch.where(binary, 0.0, math.inf)
    ring = binary.float()
    for d in range(1, radius + 1):
        ring = F.max_pool2d(ring[:, None], 3, stride=1, padding=1)[:, 0]
        distance = torch.where((ring > 0) & torch.isinf(distance), float(d), distance)
    # nearest first, then stronger evidence (in [0, 1], so 2·d dominates), argmax ties -> lower index
    score = torch.where(torch.isinf(distance), -math.inf, evidence - 2.0 * torch.nan_to_num(distance, posinf=0.0))
    winner = score.argmax(0)
    claimed = torch.isfinite(score).any(0)
    owned = torch.stack([(winner == j) & claimed for j in range(k)]).float()

    soft = _exact_cap(feather_mask(owned, latent_radius(_whole(feather))).clamp(0.0, 1.0))
    empty = [j for j in range(k) if not bool(owned[j].any())]
    return MaskResult(soft.float(), empty, labels, list(notes or []))


def overlay(masks: torch.Tensor, image: torch.Tensor | None = None, alpha: float = 0.5) -> torch.Tensor:
    """An RGB [3, H, W] picture of masks [k, H, W] for users: a distinct colour per concept
    (palette cycles after 8), alpha-blended over an optional image [3, h, w] in [0, 1]
    resized to the masks' size (black when no image). Values in [0, 1]."""
    if masks.dim() != 3:
        raise ValueError(f"masks must be [concepts, H, W], got shape {tuple(masks.shape)}")
    if image is not None and (image.dim() != 3 or image.shape[0] != 3):
        raise ValueError(f"image must be [3, h, w], got shape {tuple(image.shape)}")
    m = masks.float()
    colours = _PALETTE.to(m.device)[torch.arange(len(m), device=m.device) % len(_PALETTE)]
    painted = torch.einsum("khw,kc->chw", m, colours)
    coverage = m.sum(0, keepdim=True).clamp(0, 1)
    if image is None:
        base = torch.zeros(3, *m.shape[-2:], device=m.device)
    else:
        base = image.float().to(m.device)
        if tuple(base.shape[-2:]) != tuple(m.shape[-2:]):
            base = F.interpolate(base[None], size=tuple(m.shape[-2:]), mode="bilinear", align_corners=False)[0]
    return (base * (1 - alpha * coverage) + alpha * painted).clamp(0, 1)
