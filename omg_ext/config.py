"""OMG settings: one typed, validated model and one field table for UI, infotext and API.

Every setting is declared once, in ``FIELDS`` (global) or ``CONCEPT_FIELDS`` (per
concept), with its attribute, infotext name, parser and label. The infotext, API
dictionary and positional (UI / ``alwayson_scripts``) forms are all derived from those
tables, so a new setting is one line. Dataclasses, not pydantic: the two WebUIs ship
different pydantic major versions.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

MAX_CONCEPTS = 5
MASK_SOURCES = ("attention", "attention+sam", "detector+sam", "regions", "regions+sam")
SAM_MODELS = ("vit_b", "vit_l", "vit_h")
DETECTORS = ("auto", "grounding-dino", "owlv2", "owlvit")
INSTANCE_ORDERS = ("attention", "left_to_right")
GUIDANCES = ("own", "shared")
"""How concept rows are guided (two passes): ``own``: against each concept's negative prompt with its LoRA (the
paper's); ``shared``: against the host's uncond rows, no LoRA (k rows fewer per image; measured in the toy world:
docs/quality.md)."""
BACKGROUNDS = ("pass 1", "redrawn")
"""Pass 2 outside the masks (two passes): ``pass 1``: the layout pass's own outputs, a row fewer per image and step;
``redrawn``: the host's cond rows run again with pass 1's cross-attention (measured in the toy world:
docs/quality.md)."""
MASK_SPLITS = ("figures", "pixels")
"""How the attention masks are shared out between concepts: ``figures``: the concepts' maps pooled, each
connected figure goes whole to one concept, touching figures are cut into bands at their mass (assigned by
each concept's own attention); ``pixels``: each pixel to the concept whose attention is strongest there (only
same-word concepts are split as figures). Measured in the toy world: docs/quality.md."""
MODES = ("two passes", "one pass", "fast")
"""``two passes``: layout pass, then concept rows beside the host's (the paper's method);
``one pass``: no layout pass: the host's rows until the blend start, then concept rows as in pass 2, the
background their mean (``OmgSession.begin_fast(concept_rows=True)``);
``fast``: one pass, each concept's LoRA and prompt masked in the host's rows (``engine/fast.py``).
Measured side by side: docs/quality.md ("Where fast mode loses quality")."""
ONE_PASS_MODES = ("one pass", "fast")
"""The modes without a layout pass: their masks come from the steps before the blend start."""
WEIGHT_RANGE = (-5.0, 5.0)
PIXELS_RANGE = (0, 256)
NO_CONTROL_UNIT = -1
MAX_CONTROL_UNIT = 9
"""A concept's own ControlNet unit: the unit's number in the WebUI's ControlNet panel (0 for "ControlNet Unit 0"),
or -1 for none; the panel has at most 10 units."""


class OmgConfigError(ValueError):
    """A bad setting; ``field`` names it (``blend_start``, ``concepts[2].class_word``)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise OmgConfigError(name, f"{name} must be true or false, got {value!r}")


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise OmgConfigError(name, f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise OmgConfigError(name, f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise OmgConfigError(name, f"{name} must be a finite number, got {value!r}")
    return number


def _int(value: Any, name: str) -> int:
    number = _float(value, name)
    if number != int(number):
        raise OmgConfigError(name, f"{name} must be a whole number, got {value!r}")
    return int(number)


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise OmgConfigError(name, f"{name} must be text, got {value!r}")
    return value


@dataclass(frozen=True)
class Field:
    """One setting: attribute, infotext name (``{n}`` = concept number), parser, UI label."""

    attr: str
    infotext: str
    parse: Callable[[Any, str], Any]
    label: str


CHOICES = {"mask_source": MASK_SOURCES, "sam_model": SAM_MODELS, "detector": DETECTORS, "instance_order": INSTANCE_ORDERS,
           "mode": MODES, "concept_guidance": GUIDANCES, "background": BACKGROUNDS, "mask_split": MASK_SPLITS}
"""The settings that take one of a list of values: what ``validate`` accepts, the UI's dropdowns, the X/Y/Z axes' choices."""

FIELDS = (
    Field("enabled", "OMG", _bool, "OMG multi-concept"),
    Field("blend_start", "OMG blend start", _float, "Blend start (fraction of steps)"),
    Field("mask_source", "OMG mask source", _str, "Mask source"),
    Field("layout_preservation", "OMG layout", _bool, "Preserve layout (cross-attention)"),
    Field("self_attention_until", "OMG self attn until", _float, "Preserve self-attention until (fraction of steps)"),
    Field("mask_dilation", "OMG mask dilation", _int, "Mask dilation (px)"),
    Field("mask_feather", "OMG mask feather", _int, "Mask feather (px)"),
    Field("show_masks", "OMG show masks", _bool, "Show the masks (over the image)"),
    Field("hires_blend", "OMG hires blend", _bool, "Blend concepts during hires fix"),
    Field("sam_model", "OMG SAM model", _str, "Segment Anything model"),
    Field("detector", "OMG detector", _str, "Class-word detector"),
    Field("instance_order", "OMG instance order", _str, "Instances (figures, same-word concepts): order"),
    Field("regions", "OMG regions", _str, "Regions (drawn boxes or uploaded mask, JSON)"),
    Field("mode", "OMG mode", _str, "Mode"),
    Field("concept_guidance", "OMG concept guidance", _str, "Concepts guided against (own: their negative prompts; shared: the global one)"),
    Field("background", "OMG background", _str, "Background in pass 2 (pass 1: kept from the layout pass; redrawn: drawn again)"),
    Field("mask_split", "OMG mask split", _str, "Masks shared out by (figures: each figure to one concept; pixels: the strongest attention)"),
    Field("show_layout", "OMG show layout", _bool, "Show the layout image (pass 1; one more VAE decode)"),
)

CONCEPT_FIELDS = (
    Field("lora", "OMG c{n} lora", _str, "LoRA"),
    Field("lora_hash", "OMG c{n} lora hash", _str, "LoRA hash"),
    Field("unet_weight", "OMG c{n} weight", _float, "UNet weight"),
    Field("te_weight", "OMG c{n} te weight", _float, "Text encoder weight"),
    Field("class_word", "OMG c{n} class", _str, "Class word in the prompt"),
    Field("prompt", "OMG c{n} prompt", _str, "Concept prompt"),
    Field("negative_prompt", "OMG c{n} negative", _str, "Concept negative prompt"),
    Field("control_unit", "OMG c{n} control unit", _int, "ControlNet or IP-Adapter unit for this concept only"),
)

OPTIONAL = {"lora": "", "lora_hash": "", "negative_prompt": "", "regions": "", "control_unit": NO_CONTROL_UNIT}
"""Left out of the infotext at these values (their defaults), to keep the PNG info short."""


@dataclass
class ConceptSpec:
    lora: str = ""
    lora_hash: str = ""
    unet_weight: float = 1.0
    te_weight: float = 1.0
    class_word: str = ""
    prompt: str = ""
    negative_prompt: str = ""
    control_unit: int = NO_CONTROL_UNIT

    def is_unused(self) -> bool:
        return not self.class_word.strip() and not self.prompt.strip()

    def validate(self, n: int) -> None:
        where = f"concepts[{n}]"
        if not self.class_word.strip():
            raise OmgConfigError(f"{where}.class_word", f"OMG concept {n}: the class word is empty")
        if not self.prompt.strip():
            raise OmgConfigError(f"{where}.prompt", f"OMG concept {n}: the concept prompt is empty")
        for attr in ("unet_weight", "te_weight"):
            value = getattr(self, attr)
            if not (math.isfinite(value) and WEIGHT_RANGE[0] <= value <= WEIGHT_RANGE[1]):
                raise OmgConfigError(f"{where}.{attr}", f"OMG concept {n}: {attr.replace('_', ' ')} must be within {WEIGHT_RANGE}, got {value}")
        if not NO_CONTROL_UNIT <= self.control_unit <= MAX_CONTROL_UNIT:
            raise OmgConfigError(f"{where}.control_unit", f"OMG concept {n}: the ControlNet unit must be 0 to {MAX_CONTROL_UNIT} "
                                 f"(the unit's number in the ControlNet panel) or -1 for none, got {self.control_unit}")


@dataclass
class OmgConfig:
    enabled: bool = False
    blend_start: float = 0.35
    mask_source: str = "attention"
    layout_preservation: bool = True
    self_attention_until: float = 0.0
    mask_dilation: int = 8
    mask_feather: int = 8
    show_masks: bool = True
    hires_blend: bool = True  # measured in the toy world: a plain hires pass erases the identities (docs/quality.md)
    sam_model: str = "vit_b"
    detector: str = "auto"
    instance_order: str = "attention"
    regions: str = ""
    mode: str = "two passes"
    concept_guidance: str = "shared"
    background: str = "pass 1"
    mask_split: str = "figures"
    show_layout: bool = False  # a second VAE decode per image, on every job: asked for, not paid by default
    concepts: list[ConceptSpec] = field(default_factory=list)

    def validate(self) -> "OmgConfig":
        """Raise ``OmgConfigError`` naming the first bad setting. (A class word missing from the
        prompt is not an error: the host adapter skips that concept with a warning.)"""
        for attr in ("blend_start", "self_attention_until"):
            value = getattr(self, attr)
            if not 0 <= value <= 1:
                raise OmgConfigError(attr, f"OMG {attr.replace('_', ' ')} must be between 0 and 1 (got {value})")
        for attr, choices in CHOICES.items():
            if getattr(self, attr) not in choices:
                raise OmgConfigError(attr, f"OMG {attr.replace('_', ' ')} must be one of {', '.join(choices)} (got {getattr(self, attr)!r})")
        if self.mode in ONE_PASS_MODES and self.mask_source != "regions" and self.blend_start == 0:
            raise OmgConfigError("blend_start", f"OMG {self.mode} mode makes {self.mask_source} masks from the steps "
                                 "before the blend start: the blend start must be above 0 (or use drawn regions)")
        if self.mask_source.startswith("regions") and self.enabled and not self.regions.strip():
            raise OmgConfigError("regions", f"OMG mask source {self.mask_source} needs regions: draw a box per concept or upload a mask image")
        for attr in ("mask_dilation", "mask_feather"):
            value = getattr(self, attr)
            if not PIXELS_RANGE[0] <= value <= PIXELS_RANGE[1]:
                raise OmgConfigError(attr, f"OMG {attr.replace('_', ' ')} must be {PIXELS_RANGE[0]} to {PIXELS_RANGE[1]} pixels (got {value})")
        if not self.enabled:
            return self
        if not self.concepts:
            raise OmgConfigError("concepts", "OMG needs at least one concept")
        if len(self.concepts) > MAX_CONCEPTS:
            raise OmgConfigError("concepts", f"OMG supports at most {MAX_CONCEPTS} concepts (got {len(self.concepts)})")
        for n, concept in enumerate(self.concepts, start=1):
            concept.validate(n)
        units = list(self.control_units().values())
        if units and self.mode != "two passes":
            raise OmgConfigError("mode", f"OMG {self.mode} mode: a ControlNet or IP-Adapter unit for one concept needs "
                                 "the two-pass mode")
        if len(set(units)) < len(units):
            raise OmgConfigError("concepts", f"OMG: two concepts name the same ControlNet unit ({', '.join(map(str, units))}); give each its own")
        return self

    def control_units(self) -> dict[int, int]:
        """Concept (0-based) -> the number of its own ControlNet unit in the panel, for the concepts that have one."""
        return {j: c.control_unit for j, c in enumerate(self.concepts) if c.control_unit != NO_CONTROL_UNIT}

    def mask_groups(self) -> list[list[int]]:
        """Concepts whose attention masks are split into instances (``masks.split_instances``): all of them
        with ``mask_split`` "figures", else those sharing a class word ("a man and a man")."""
        if self.mask_split == "figures" and len(self.concepts) > 1:
            return [list(range(len(self.concepts)))]
        by_word: dict[str, list[int]] = {}
        for j, concept in enumerate(self.concepts):
            by_word.setdefault(concept.class_word.strip().lower(), []).append(j)
        return [group for group in by_word.values() if len(group) > 1]


_LORA_TAG = re.compile(r"<(?:lora|lyco|hypernet):[^>]*>", re.IGNORECASE)


def _parse_into(target: dict, table: Sequence[Field], values: dict, key_of: Callable[[Field], str],
                name_of: Callable[[Field], str] | None = None) -> None:
    """Parse the table's fields found in ``values`` (under ``key_of(f)``) into ``target``; errors say ``name_of(f)``."""
    for f in table:
        key = key_of(f)
        if key in values:
            target[f.attr] = f.parse(values[key], (name_of or key_of)(f))


def _config(values: dict, concepts: list[dict]) -> OmgConfig:
    return OmgConfig(**values, concepts=[ConceptSpec(**c) for c in concepts])


def to_infotext(cfg: OmgConfig) -> dict[str, Any]:
    """PNG-info entries of an enabled config (empty when disabled)."""
    if not cfg.enabled:
        return {}
    out = {f.infotext: getattr(cfg, f.attr) for f in FIELDS if not (f.attr in OPTIONAL and getattr(cfg, f.attr) == OPTIONAL[f.attr])}
    for n, concept in enumerate(cfg.concepts, start=1):
        for f in CONCEPT_FIELDS:
            value = getattr(concept, f.attr)
            if not (f.attr in OPTIONAL and value == OPTIONAL[f.attr]):
                out[f.infotext.format(n=n)] = value
    return out


def from_infotext(params: dict[str, Any]) -> OmgConfig | None:
    """The config a PNG info describes (values as the WebUI parses them: strings), or None."""
    if "OMG" not in params:
        return None
    values: dict = {}
    _parse_into(values, FIELDS, params, lambda f: f.infotext)
    concepts = []
    for n in range(1, MAX_CONCEPTS + 1):
        concept: dict = {}
        _parse_into(concept, CONCEPT_FIELDS, params, lambda f: f.infotext.format(n=n))
        if concept:
            concepts.append(concept)
    return _config(values, concepts)


def to_dict(cfg: OmgConfig) -> dict[str, Any]:
    """The API's named form: attribute names, ``concepts`` a list of dicts."""
    return asdict(cfg)


def from_dict(d: dict[str, Any]) -> OmgConfig:
    """Parse the API's named form; unknown keys and wrong types are named in the error."""
    if not isinstance(d, dict):
        raise OmgConfigError("args", f"OMG settings must be a dictionary, got {type(d).__name__}")
    known = [f.attr for f in FIELDS] + ["concepts"]
    for key in d:
        if key not in known:
            raise OmgConfigError(key, f"unknown OMG setting {key!r}; valid settings: {', '.join(known)}")
    values: dict = {}
    _parse_into(values, FIELDS, d, lambda f: f.attr)
    raw = d.get("concepts", [])
    if not isinstance(raw, list):
        raise OmgConfigError("concepts", "OMG concepts must be a list of dictionaries")
    concept_keys = [f.attr for f in CONCEPT_FIELDS]
    concepts = []
    for n, item in enumerate(raw, start=1):
        if not isinstance(item, dict):
            raise OmgConfigError(f"concepts[{n}]", f"OMG concept {n} must be a dictionary, got {item!r}")
        for key in item:
            if key not in concept_keys:
                raise OmgConfigError(f"concepts[{n}].{key}", f"unknown OMG concept {n} setting {key!r}; valid settings: {', '.join(concept_keys)}")
        concept: dict = {}
        _parse_into(concept, CONCEPT_FIELDS, item, lambda f: f.attr, lambda f: f"concepts[{n}].{f.attr}")
        concepts.append(concept)
    return _config(values, concepts)


ARGS_COUNT = len(FIELDS) + MAX_CONCEPTS * len(CONCEPT_FIELDS)


def to_args(cfg: OmgConfig) -> list:
    """The flat positional form of the UI: globals in FIELDS order, then MAX_CONCEPTS concept blocks."""
    slots = cfg.concepts + [ConceptSpec()] * (MAX_CONCEPTS - len(cfg.concepts))
    return [getattr(cfg, f.attr) for f in FIELDS] + [getattr(c, f.attr) for c in slots for f in CONCEPT_FIELDS]


def from_args(args: Sequence) -> OmgConfig:
    """Parse the UI's positional values, or a dict first (API users; the WebUI pads the rest)."""
    if args and isinstance(args[0], dict):
        return from_dict(args[0])
    if not args:  # a request that left the script out (Forge's API before its scripts are loaded): not enabled
        return OmgConfig()
    if len(args) != ARGS_COUNT:
        raise OmgConfigError("args", f"OMG expects {ARGS_COUNT} values ({len(FIELDS)} settings and {MAX_CONCEPTS} concepts of {len(CONCEPT_FIELDS)}), or one dictionary; got {len(args)}")
    values: dict = {}
    _parse_into(values, FIELDS, dict(zip((f.attr for f in FIELDS), args)), lambda f: f.attr)
    concepts = []
    rest = list(args[len(FIELDS):])
    for n in range(MAX_CONCEPTS):
        block = dict(zip((f.attr for f in CONCEPT_FIELDS), rest[n * len(CONCEPT_FIELDS):(n + 1) * len(CONCEPT_FIELDS)]))
        concept: dict = {}
        _parse_into(concept, CONCEPT_FIELDS, block, lambda f: f.attr, lambda f: f"concepts[{n + 1}].{f.attr}")
        if not ConceptSpec(**concept).is_unused():
            concepts.append(concept)
    if values.get("enabled") and not concepts:
        raise OmgConfigError("concepts", POSITIONAL_WITHOUT_CONCEPTS)
    return _config(values, concepts)


POSITIONAL_WITHOUT_CONCEPTS = (
    "OMG needs at least one concept: fill a concept row (its class word and prompt). Over the API, pass one dictionary "
    '({"enabled": true, "concepts": [{"lora": "char1", "class_word": "man", "prompt": "a man, red jacket"}]}) or all '
    f"{ARGS_COUNT} positional values: the {len(FIELDS)} settings ({', '.join(f.attr for f in FIELDS)}), then "
    f"{MAX_CONCEPTS} concepts of {len(CONCEPT_FIELDS)} ({', '.join(f.attr for f in CONCEPT_FIELDS)}); the WebUI fills "
    "the values a request leaves out with the UI's defaults, which have no concept")
"""Why an enabled positional request has no concept: usually a short list (``[true, 0.3]``) padded by the WebUI."""


XYZ_AXES = (
    ("[OMG] Blend start", float, "blend_start"),
    ("[OMG] Mask source", str, "mask_source"),
    ("[OMG] Mode", str, "mode"),
    ("[OMG] Mask split", str, "mask_split"),
    *((f"[OMG] Concept {n} LoRA weight", float, f"concepts[{n - 1}].unet_weight") for n in range(1, MAX_CONCEPTS + 1)),
)
"""(label, type, setting path) of the X/Y/Z plot axes."""


def with_overrides(cfg: OmgConfig, overrides: dict[str, Any]) -> OmgConfig:
    """``cfg`` with X/Y/Z values applied (paths as in ``XYZ_AXES``); a concept the config lacks is named."""
    for path, value in overrides.items():
        if path.startswith("concepts["):
            index, attr = int(path[len("concepts["):path.index("]")]), path.split(".", 1)[1]
            if index >= len(cfg.concepts):
                raise OmgConfigError(path, f"OMG X/Y/Z: concept {index + 1} is not set up")
            setattr(cfg.concepts[index], attr, value)
        else:
            setattr(cfg, path, value)
    return cfg


def top_tags(tag_frequency: Any, count: int = 3) -> str:
    """The most frequent training tags of a kohya LoRA (``ss_tag_frequency``: dataset -> tag -> count)."""
    totals: dict[str, int] = {}
    for tags in (tag_frequency or {}).values() if isinstance(tag_frequency, dict) else ():
        for tag, n in tags.items():
            totals[tag.strip()] = totals.get(tag.strip(), 0) + int(n)
    return ", ".join(sorted(totals, key=lambda t: (-totals[t], t))[:count])


def prefill_prompt(global_prompt: str, trigger_words: str) -> str:
    """A concept prompt to start from: the global prompt without LoRA tags, plus the LoRA's trigger words."""
    base = re.sub(r"\s+", " ", _LORA_TAG.sub("", global_prompt)).strip(" ,")
    return ", ".join(part for part in (base, trigger_words.strip()) if part)


_PROMPT_LORA = re.compile(r"<(?:lora|lyco):([^:>]+)[:>]", re.IGNORECASE)


def concept_loras_in_prompt(cfg: OmgConfig, prompts: Sequence[str]) -> list[str]:
    """Warnings for concepts whose LoRA the main prompt also names (``<lora:name:…>``): the WebUI applies such a
    tag to the whole picture, every character's rows included, which is the bleeding OMG avoids."""
    named = {m.strip().lower() for prompt in prompts for m in _PROMPT_LORA.findall(prompt)}
    return [f"OMG concept {n}'s LoRA {spec.lora!r} is also in the prompt (<lora:{spec.lora}:…>): the WebUI applies it to "
            "the whole picture, every character included, which brings back the bleeding OMG avoids; take it out of the prompt"
            for n, spec in enumerate(cfg.concepts, start=1) if spec.lora and spec.lora.strip().lower() in named]


def compact(cfg: OmgConfig) -> str:
    """One line for logs: ``OMG s=0.30 attention 2 concepts: man<loraA:0.8>, woman<loraB:1.0>``."""
    parts = [f"{c.class_word}<{c.lora or 'no LoRA'}:{c.unet_weight:g}>" for c in cfg.concepts]
    return f"OMG {cfg.mode} s={cfg.blend_start:.2f} {cfg.mask_source} {len(cfg.concepts)} concepts: {', '.join(parts)}"

