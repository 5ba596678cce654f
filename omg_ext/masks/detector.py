"""Zero-shot text detection of class words in the layout image, with whatever ``transformers`` offers.

The paper grounds class words with GroundingDINO; ``transformers`` has it from 4.38 (Forge
ships 4.46). A1111 v1.10 pins transformers 4.30.2, which has OWL-ViT only (OWLv2 came in
4.35). The user's packages are never upgraded: the best detector the installed version
has is used. Weights come through ``from_pretrained`` into the WebUI's
``models/omg-detectors`` folder; offline, a missing model is a ``MissingModelFile``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

from ..config import DETECTORS
from .model_files import MissingModelFile

BACKENDS = {
    "grounding-dino": ("GroundingDinoForObjectDetection", "IDEA-Research/grounding-dino-tiny"),
    "owlv2": ("Owlv2ForObjectDetection", "google/owlv2-base-patch16-ensemble"),
    "owlvit": ("OwlViTForObjectDetection", "google/owlvit-base-patch32"),
}
"""Name -> (transformers class, model id), best first; ``config.DETECTORS`` lists them after "auto"."""


def available_backend(preferred: str = "auto") -> str:
    """The detector to use: ``preferred`` if the installed transformers has it, else the best it has."""
    import transformers

    if preferred not in DETECTORS:
        raise ValueError(f"detector must be one of {', '.join(DETECTORS)}, got {preferred!r}")
    have = [name for name, (cls, _) in BACKENDS.items() if getattr(transformers, cls, None) is not None]
    if not have:
        raise MissingModelFile(f"OMG: transformers {transformers.__version__} has no zero-shot detector")
    return preferred if preferred in have else have[0]


@dataclass
class Detector:
    """A loaded detector: its processor, model and backend name."""

    backend: str
    processor: object
    model: torch.nn.Module

    @torch.no_grad()
    def detect(self, image: numpy.ndarray, words: list[str], threshold: float = 0.1) -> dict[str, list[tuple[float, tuple]]]:
        """Per word, (score, (x0, y0, x1, y1) in pixels) of each detection in ``image`` (H×W×3 uint8)."""
        from PIL import Image

        pil = Image.fromarray(image)
        device = next(self.model.parameters()).device
        if self.backend == "grounding-dino":
            return self._grounded(pil, words, threshold, device)
        inputs = self.processor(text=[words], images=pil, return_tensors="pt").to(device)
        outputs = self.model(**inputs)
        size = torch.tensor([[pil.height, pil.width]])  # OWLv2's post-processing knows its square padding
        result = self.processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=size)[0]
        found: dict[str, list[tuple[float, tuple]]] = {w: [] for w in words}
        for score, label, box in zip(result["scores"], result["labels"], result["boxes"]):
            found[words[int(label)]].append((float(score), tuple(float(v) for v in box)))
        return found

    def _grounded(self, pil, words: list[str], threshold: float, device) -> dict[str, list[tuple[float, tuple]]]:
        """GroundingDINO on the caption "w1. w2.": each box goes to the word whose tokens score it highest.

        Scoring the word spans directly (instead of the processor's phrase labels, which join every
        token over the text threshold) keeps "man" and "woman" apart, and does not depend on the
        post-processing arguments, which changed between transformers versions.
        """
        tokenizer = self.processor.tokenizer
        spans, start = [], 1  # after [CLS]; each word is followed by its "."
        for word in words:
            n = len(tokenizer(word, add_special_tokens=False)["input_ids"])
            spans.append((start, start + n))
            start += n + 1
        inputs = self.processor(images=pil, text=". ".join(words) + ".", return_tensors="pt").to(device)
        outputs = self.model(**inputs)
        token_scores = outputs.logits[0].sigmoid()  # (queries, text tokens)
        word_scores = torch.stack([token_scores[:, a:b].max(-1).values for a, b in spans], -1)
        best, label = word_scores.max(-1)
        cx, cy, w, h = outputs.pred_boxes[0].float().unbind(-1)
        scale = torch.tensor([pil.width, pil.height, pil.width, pil.height], dtype=torch.float32, device=cx.device)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * scale
        found: dict[str, list[tuple[float, tuple]]] = {w: [] for w in words}
        for i in torch.nonzero(best > threshold).flatten().tolist():
            found[words[int(label[i])]].append((float(best[i]), tuple(float(v) for v in boxes[i])))
        return found


def load_detector(backend: str, folder: str | Path, device: torch.device | str = "cpu",
                  local_only: bool = False) -> Detector:
    """The backend's processor and model from the HF cache in ``folder`` (downloaded there unless ``local_only``)."""
    import transformers

    cls_name, model_id = BACKENDS[backend]
    try:
        processor = transformers.AutoProcessor.from_pretrained(model_id, cache_dir=folder, local_files_only=local_only)
        model = getattr(transformers, cls_name).from_pretrained(model_id, cache_dir=folder, local_files_only=local_only)
    except OSError as e:
        raise MissingModelFile(f"OMG: the {backend} detector ({model_id}) is not in {folder} and could not be "
                               f"downloaded ({e.__class__.__name__}); download it from https://huggingface.co/{model_id} "
                               f"into {folder}") from e
    except Exception as e:  # noqa: BLE001 - an optional model: the job falls back to attention masks
        # e.g. A1111's safe unpickler refusing pytorch_model.bin makes torch.load return None inside transformers
        raise MissingModelFile(f"OMG: the {backend} detector in {folder} could not be loaded ({e.__class__.__name__}: {e}; "
                               "see the console); delete its folder there to download it again") from e
    return Detector(backend, processor, model.to(device).eval())
