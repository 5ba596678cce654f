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

from .model_files import MissingModelFile

BACKENDS = {
    "grounding-dino": ("GroundingDinoForObjectDetection", "IDEA-Research/grounding-dino-tiny"),
    "owlv2": ("Owlv2ForObjectDetection", "google/owlv2-base-patch16-ensemble"),
    "owlvit": ("OwlViTForObjectDetection", "google/owlvit-base-patch32"),
}
"""Name -> (transformers class, model id), best first."""

DETECTORS = ("auto", *BACKENDS)


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
        size = torch.tensor([[pil.height, pil.width]])
        device = next(self.model.parameters()).device
        found: dict[str, list[tuple[float, tuple]]] = {w: [] for w in words}
        if self.backend == "grounding-dino":
            inputs = self.processor(images=pil, text=". ".join(words) + ".", return_tensors="pt").to(device)
            outputs = self.model(**inputs)
            result = self.processor.post_process_grounded_object_detection(
                outputs, inputs["input_ids"], box_threshold=threshold, text_threshold=threshold, target_sizes=size)[0]
            for score, label, box in zip(result["scores"], result["labels"], result["boxes"]):
                word = next((w for w in words if w.lower() in str(label).lower()), None)
                if word is not None:
                    found[word].append((float(score), tuple(float(v) for v in box)))
            return found
        inputs = self.processor(text=[words], images=pil, return_tensors="pt").to(device)
        outputs = self.model(**inputs)
        result = self.processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=size)[0]
        for score, label, box in zip(result["scores"], result["labels"], result["boxes"]):
            found[words[int(label)]].append((float(score), tuple(float(v) for v in box)))
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
    return Detector(backend, processor, model.to(device).eval())
