"""Score real generations as the multi-concept papers do: CLIP-T and CLIP-I, from a folder of PNGs.

    python benchmarks/evaluate.py OUTPUT_DIR --clip openai/clip-vit-large-patch14 \\
        --refs char1=refs/char1 --refs char2=refs/char2 [--detector owlvit=FOLDER] [--group-by "OMG blend start"]

For every PNG in OUTPUT_DIR that carries the WebUI's infotext ("parameters"):

- CLIP-T: cosine similarity between the image and its prompt (the global prompt, LoRA
  tags removed), in CLIP's joint embedding;
- CLIP-I, per concept: cosine similarity between the concept's crop and the mean
  embedding of that concept's reference images (``--refs LORA_NAME=FOLDER``, matched by the
  concept's ``OMG cN lora``). The crop is the box a zero-shot detector finds for the
  concept's class word (``--detector BACKEND=HF_CACHE_FOLDER``, the same detectors and box
  assignment as the ``detector+sam`` mask source: same-word concepts left to right); without
  a detector, or when it finds nothing, the whole image.

Images without OMG in their infotext (a plain or global-LoRA run for comparison) are
scored too: their concepts are taken from ``--concepts`` (``LORA_NAME:class_word``, in
order). Printed: one line per image, then the means per ``--group-by`` value (an infotext
key; default: OMG on or off). Nothing is downloaded unless ``--clip`` names a model id
that transformers may fetch.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from omg_ext.config import from_infotext  # noqa: E402

PARAM = re.compile(r'\s*([\w][\w \-/]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
LORA_TAG = re.compile(r"<(?:lora|lyco):[^>]*>")


def parse_infotext(text: str) -> tuple[str, dict[str, str]]:
    """(prompt, {key: value}) of a WebUI infotext: prompt lines, "Negative prompt:", then "key: value, ..."."""
    lines = text.strip().split("\n")
    params: dict[str, str] = {}
    if lines and PARAM.findall(lines[-1]) and ":" in lines[-1]:
        for key, value in PARAM.findall(lines.pop()):
            if value.startswith('"') and value.endswith('"') and len(value) >= 2:
                value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            params[key.strip()] = value.strip()
    prompt = []
    for line in lines:
        if line.startswith("Negative prompt:"):
            break
        prompt.append(line)
    return "\n".join(prompt).strip(), params


class Clip:
    """A transformers CLIP model: normalised image and text embeddings."""

    def __init__(self, name_or_path: str, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor
        self.model = CLIPModel.from_pretrained(name_or_path).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(name_or_path)
        self.device = device

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        return torch.nn.functional.normalize(self.model.get_image_features(**inputs).float(), dim=-1)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        inputs = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
        return torch.nn.functional.normalize(self.model.get_text_features(**inputs).float(), dim=-1)


def reference_embedding(clip: Clip, folder: Path) -> torch.Tensor:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise SystemExit(f"evaluate: no reference images in {folder}")
    return torch.nn.functional.normalize(clip.images([Image.open(p).convert("RGB") for p in files]).mean(0), dim=0)


def concept_boxes(detector, image: Image.Image, words: list[str]) -> list[tuple | None]:
    """One box per concept (same-word concepts left to right), or None where nothing was found."""
    if detector is None:
        return [None] * len(words)
    found = detector.detect(np.asarray(image), sorted(set(words)))
    boxes, taken = [], defaultdict(int)
    for word in words:
        ranked = sorted((box for _, box in found.get(word, [])), key=lambda b: b[0])
        boxes.append(ranked[taken[word]] if taken[word] < len(ranked) else None)
        taken[word] += 1
    return boxes


def score_image(clip: Clip, path: Path, refs: dict[str, torch.Tensor], detector, fallback: list[tuple[str, str]]) -> dict:
    image = Image.open(path)
    text = image.info.get("parameters")
    if text is None:
        return {}
    prompt, params = parse_infotext(text)
    image = image.convert("RGB")
    cfg = from_infotext(params)
    concepts = [(c.lora, c.class_word) for c in cfg.concepts] if cfg is not None and cfg.enabled else fallback
    result = {"file": path.name, "omg": "on" if cfg is not None and cfg.enabled else "off", "params": params,
              "clip_t": float(clip.images([image])[0] @ clip.texts([LORA_TAG.sub("", prompt)])[0])}
    for n, ((lora, word), box) in enumerate(zip(concepts, concept_boxes(detector, image, [w for _, w in concepts])), 1):
        if lora in refs:
            crop = image.crop(tuple(int(round(v)) for v in box)) if box is not None else image
            result[f"clip_i_{n}"] = float(clip.images([crop])[0] @ refs[lora])
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--clip", default="openai/clip-vit-large-patch14", help="model id or local folder")
    parser.add_argument("--refs", action="append", default=[], help="LORA_NAME=FOLDER of reference images")
    parser.add_argument("--concepts", nargs="*", default=[], help="LORA_NAME:class_word for images without OMG")
    parser.add_argument("--detector", help="BACKEND=FOLDER (owlvit, owlv2, grounding_dino; FOLDER the HF cache)")
    parser.add_argument("--group-by", default=None, help="an infotext key to average by (default: OMG on/off)")
    args = parser.parse_args(argv)
    clip = Clip(args.clip)
    refs = {}
    for item in args.refs:
        name, _, folder = item.partition("=")
        refs[name] = reference_embedding(clip, Path(folder))
    detector = None
    if args.detector:
        from omg_ext.masks.detector import load_detector
        backend, _, folder = args.detector.partition("=")
        detector = load_detector(backend, folder, local_only=True)
    fallback = [tuple(c.split(":", 1)) for c in args.concepts]
    rows = [r for p in sorted(args.folder.glob("*.png")) if (r := score_image(clip, p, refs, detector, fallback))]
    if not rows:
        raise SystemExit(f"evaluate: no PNG with WebUI infotext in {args.folder}")
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        scores = "  ".join(f"{k} {v:.4f}" for k, v in r.items() if k.startswith("clip"))
        print(f"{r['file']}: {scores}")
        groups[r["params"].get(args.group_by, "-") if args.group_by else f"OMG {r['omg']}"].append(r)
    print(f"\nmeans by {args.group_by or 'OMG on/off'}:")
    for key, members in groups.items():
        names = sorted({k for r in members for k in r if k.startswith("clip")})
        means = "  ".join(f"{k} {np.mean([r[k] for r in members if k in r]):.4f}" for k in names)
        print(f"  {key} ({len(members)} images): {means}")


if __name__ == "__main__":
    main()
