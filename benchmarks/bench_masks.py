"""Time of each mask source per image, side by side in one run (CPU, random weights, nothing downloaded).

SAM is the real ``segment-anything`` ViT-B (``--sam vit_b``) with random weights; the
detectors are the real ``transformers`` architectures of the WebUI model ids (OWL-ViT
base/32 and GroundingDINO tiny, default configs) with random weights and a small
tokenizer vocabulary (which does not change the cost of the image side). Random weights
give arbitrary masks: this measures time, not quality. Each source runs ``--runs`` times
after one warm-up; the median is printed.

    python benchmarks/bench_masks.py --size 512 --runs 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minisd.torchvision_shim import ensure_torchvision_ops  # noqa: E402
ensure_torchvision_ops()

from omg_ext.masks.detector import Detector  # noqa: E402
from omg_ext.masks.sources import MaskInputs, MaskModels, concept_masks  # noqa: E402
from omg_ext.masks.regions import parse_regions  # noqa: E402
from omg_ext.masks.segment import segment  # noqa: E402


def owlvit(folder: Path) -> Detector:
    from transformers import CLIPTokenizer, OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    from minisd.mask_models import clip_tokenizer_files

    tokenizer = CLIPTokenizer(*clip_tokenizer_files(folder), pad_token="!", model_max_length=16)
    config = OwlViTConfig(text_config={"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                                       "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
    processor = OwlViTProcessor(image_processor=OwlViTImageProcessor(), tokenizer=tokenizer)
    return Detector("owlvit", processor, OwlViTForObjectDetection(config).eval())


def grounding_dino(folder: Path) -> Detector:
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection, GroundingDinoImageProcessor, GroundingDinoProcessor

    from minisd.mask_models import bert_tokenizer

    model = GroundingDinoForObjectDetection(GroundingDinoConfig()).eval()
    return Detector("grounding-dino", GroundingDinoProcessor(GroundingDinoImageProcessor(), bert_tokenizer(folder)), model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sam", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    from segment_anything import sam_model_registry

    sam = sam_model_registry[args.sam](checkpoint=None).eval()
    folder = Path(tempfile.mkdtemp())
    detectors = {"owlvit": owlvit(folder), "grounding-dino": grounding_dino(folder)}
    size, latent = args.size, args.size // 8
    image = (numpy.random.default_rng(0).random((size, size, 3)) * 255).astype(numpy.uint8)
    attention = torch.zeros(2, latent // 2, latent // 2)
    attention[0, 4:-4, 2:latent // 4] = 1
    attention[1, 4:-4, latent // 4:-2] = 1
    boxes = {"width": size, "height": size, "boxes": {"1": [0, 32, size // 2, size - 32], "2": [size // 2, 32, size, size - 32]}}
    inputs = MaskInputs(attention, (latent, latent), ["man", "woman"], image, regions=parse_regions(json.dumps(boxes), 2))
    sam_fn = lambda image, prompts: segment(sam, image, prompts)  # noqa: E731
    cases = [("attention", "attention", MaskModels()), ("regions", "regions", MaskModels()),
             ("attention+sam", "attention+sam", MaskModels(sam=lambda: sam_fn)),
             ("regions+sam", "regions+sam", MaskModels(sam=lambda: sam_fn))]
    cases += [(f"detector+sam ({name})", "detector+sam", MaskModels(sam=lambda: sam_fn, detector=lambda d=d: d))
              for name, d in detectors.items()]
    print(f"mask source time per image, {size}x{size} px, SAM {args.sam}, CPU threads {torch.get_num_threads()}, "
          f"median of {args.runs} after a warm-up")
    base = None
    for label, source, models in cases:
        concept_masks(source, inputs, models)
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            concept_masks(source, inputs, models)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        base = base or median
        print(f"  {label:28s} {median:8.3f} s   ({median / base:8.1f}x attention)")


if __name__ == "__main__":
    main()
