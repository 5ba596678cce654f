"""An extraction as a user asks for it, from the "From pictures" tab or ``POST /omg/concepts/extract``: the
pictures (PIL, or base64 in JSON like ControlNet's routes), the concepts (name, class word, a box per picture)
and the settings; each checked with a message naming what is wrong before the model is touched."""
from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import asdict, dataclass, field, fields

import torch

from ..concepts.settings import ExtractConcept, ExtractError, ExtractSettings, check_concepts
from .errors import OmgUserError

SETTINGS = ("rounds", "steps", "vectors", "learning_rate", "lora", "lora_rank", "user_masks", "rows_per_pass", "seed")
"""The settings a request may set; the others keep the defaults measured in the toy world."""
MAX_SIDE = 2048


@dataclass
class ExtractRequest:
    images: list
    """1-4 pictures of the same concepts: PIL images, or base64 strings (a data URL's prefix allowed)."""
    concepts: list[dict]
    """Per concept ``{"name", "class_word", "boxes": [[x0, y0, x1, y1] or None per picture]}`` (boxes optional)."""
    settings: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, body) -> "ExtractRequest":
        if not isinstance(body, dict):
            raise OmgUserError("the extraction request must be a JSON object")
        unknown = sorted(set(body) - {f.name for f in fields(cls)})
        if unknown:
            raise OmgUserError(f"unknown extraction field {unknown[0]!r}; valid fields: images, concepts, settings")
        if not isinstance(body.get("images"), list) or not isinstance(body.get("concepts"), list):
            raise OmgUserError("the extraction request needs 'images' (a list of base64 pictures) and 'concepts' (a list)")
        return cls(body["images"], body["concepts"], body.get("settings") or {})

    def pictures(self) -> list:
        """The pictures as RGB PIL images, all of one size, sides multiples of 8."""
        from PIL import Image

        if not 1 <= len(self.images) <= 4:
            raise OmgUserError(f"give 1 to 4 pictures of the concepts, got {len(self.images)}")
        pictures = []
        for i, image in enumerate(self.images, start=1):
            if isinstance(image, str):
                try:
                    image = Image.open(io.BytesIO(base64.b64decode(image.split(",", 1)[-1], validate=True)))
                    image.load()
                except Exception as e:  # noqa: BLE001 - whatever PIL or base64 says, the user hears which picture
                    raise OmgUserError(f"picture {i} is not a base64 PNG or JPEG: {e}") from e
            if not hasattr(image, "mode"):
                raise OmgUserError(f"picture {i} is not a picture")
            if image.mode not in ("RGB", "RGBA", "L"):
                raise OmgUserError(f"picture {i} has mode {image.mode}: give an RGB, RGBA or greyscale picture")
            pictures.append(image.convert("RGB"))
        sizes = {p.size for p in pictures}
        if len(sizes) > 1:
            raise OmgUserError("the pictures must all have one size; got " + ", ".join(f"{w}x{h}" for w, h in (p.size for p in pictures)))
        w, h = pictures[0].size
        if w % 8 or h % 8 or not 64 <= min(w, h) or max(w, h) > MAX_SIDE:
            raise OmgUserError(f"the pictures are {w}x{h}: each side must be a multiple of 8 from 64 to {MAX_SIDE}")
        return pictures

    def extract_settings(self) -> ExtractSettings:
        if not isinstance(self.settings, dict):
            raise OmgUserError("'settings' must be a JSON object")
        unknown = sorted(set(self.settings) - set(SETTINGS))
        if unknown:
            raise OmgUserError(f"unknown extraction setting {unknown[0]!r}; valid settings: {', '.join(SETTINGS)}")
        try:
            return ExtractSettings(**self.settings).validate()
        except ExtractError as e:
            raise OmgUserError(str(e)) from e

    def extract_concepts(self, size: tuple[int, int]) -> list[ExtractConcept]:
        """The concepts with their boxes as masks at the pictures' size (``size`` = (width, height))."""
        concepts = []
        for j, c in enumerate(self.concepts, start=1):
            if not isinstance(c, dict):
                raise OmgUserError(f"concept {j} must be an object with 'name' and 'class_word'")
            unknown = sorted(set(c) - {"name", "class_word", "boxes"})
            if unknown:
                raise OmgUserError(f"concept {j}: unknown field {unknown[0]!r}; valid fields: name, class_word, boxes")
            masks = [box_mask(box, size, f"concept {j}'s box {i + 1}") for i, box in enumerate(c.get("boxes") or [])]
            concepts.append(ExtractConcept(str(c.get("name", "")).strip(), str(c.get("class_word", "")), masks))
        try:
            check_concepts(concepts, len(self.images))
        except ExtractError as e:
            raise OmgUserError(str(e)) from e
        return concepts

    def info(self, pictures: list, settings: ExtractSettings) -> dict:
        """What a written file records: the pictures' hashes (of their RGB pixels) and the settings."""
        return {"pictures_sha256": [hashlib.sha256(p.tobytes()).hexdigest() for p in pictures],
                "size": list(pictures[0].size), "settings": asdict(settings),
                "concepts": [{"name": c.get("name"), "class_word": c.get("class_word")} for c in self.concepts]}


def box_mask(box, size: tuple[int, int], what: str) -> torch.Tensor | None:
    """A box ``[x0, y0, x1, y1]`` in pixels as a mask [height, width]; None (no box) stays None."""
    if box is None:
        return None
    width, height = size
    try:
        x0, y0, x1, y1 = (round(float(v)) for v in box)
    except (TypeError, ValueError) as e:
        raise OmgUserError(f"{what} must be [x0, y0, x1, y1] in pixels, got {box!r}") from e
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise OmgUserError(f"{what} {[x0, y0, x1, y1]} must lie inside the {width}x{height} picture with x0 < x1 and y0 < y1")
    mask = torch.zeros(height, width)
    mask[y0:y1, x0:x1] = 1
    return mask
