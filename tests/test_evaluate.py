"""benchmarks/evaluate.py: CLIP-T and CLIP-I from a folder of WebUI PNGs, with a random-weight CLIP."""
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import evaluate  # noqa: E402

from minisd.mask_models import tiny_clip  # noqa: E402

INFOTEXT = ('<lora:style:0.5>a man and a woman hugging\nNegative prompt: blurry\n'
            'Steps: 20, Sampler: Euler, OMG: True, OMG blend start: 0.3, OMG c1 lora: char1, OMG c1 class: man, '
            'OMG c1 prompt: "a man, red jacket", OMG c2 lora: char2, OMG c2 class: woman, OMG c2 prompt: "a woman, blue dress"')


def _png(path: Path, colour, text: str | None) -> Image.Image:
    image = Image.new("RGB", (96, 64), colour)
    image.putpixel((5, 5), (255, 255, 255))
    info = PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    image.save(path, pnginfo=info)
    return image


def test_infotext_parsing_keeps_quoted_commas():
    prompt, params = evaluate.parse_infotext(INFOTEXT)
    assert prompt == "<lora:style:0.5>a man and a woman hugging"
    assert params["OMG c1 prompt"] == "a man, red jacket" and params["OMG blend start"] == "0.3"


@torch.no_grad()
def test_scores_equal_clip_cosines_computed_independently(tmp_path, capsys):
    clip_dir = tiny_clip(tmp_path / "clip")
    out, refs = tmp_path / "out", tmp_path / "refs"
    out.mkdir()
    (refs / "char1").mkdir(parents=True)
    (refs / "char2").mkdir()
    omg_image = _png(out / "00001.png", (200, 30, 30), INFOTEXT)
    _png(out / "00002.png", (30, 30, 200), INFOTEXT.split("\nSteps")[0] + "\nSteps: 20, Sampler: Euler")  # no OMG
    _png(out / "00003.png", (0, 0, 0), None)  # no infotext: skipped
    ref_images = [_png(refs / "char1" / f"{i}.png", (200, 20 * i, 0), None) for i in range(2)]
    _png(refs / "char2" / "0.png", (0, 0, 200), None)

    evaluate.main([str(out), "--clip", str(clip_dir), "--refs", f"char1={refs / 'char1'}", "--refs",
                   f"char2={refs / 'char2'}", "--concepts", "char1:man"])
    printed = capsys.readouterr().out

    from transformers import CLIPModel, CLIPProcessor
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    norm = torch.nn.functional.normalize
    image = norm(model.get_image_features(**processor(images=[omg_image], return_tensors="pt")), dim=-1)[0]
    text = norm(model.get_text_features(**processor(text=["a man and a woman hugging"], return_tensors="pt",
                                                    padding=True, truncation=True)), dim=-1)[0]
    refs1 = norm(model.get_image_features(**processor(images=ref_images, return_tensors="pt")), dim=-1)
    ref1 = norm(refs1.mean(0), dim=0)
    assert f"00001.png: clip_t {float(image @ text):.4f}  clip_i_1 {float(image @ ref1):.4f}" in printed
    assert "00002.png: clip_t" in printed and "clip_i_2" not in printed.split("00002.png")[1].split("\n")[0]
    assert "00003.png" not in printed
    assert "OMG on (1 images)" in printed and "OMG off (1 images)" in printed


def test_a_folder_without_webui_images_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="no PNG with WebUI infotext"):
        evaluate.main([str(tmp_path), "--clip", str(tiny_clip(tmp_path / "clip"))])


def test_concept_crops_follow_the_detector_left_to_right():
    class Found:
        def detect(self, image, words):
            assert words == ["man", "woman"]
            return {"man": [(0.9, (50, 0, 90, 60)), (0.8, (0, 0, 40, 60))], "woman": [(0.7, (20, 5, 60, 50))]}

    image = Image.new("RGB", (96, 64))
    boxes = evaluate.concept_boxes(Found(), image, ["man", "woman", "man", "man"])
    assert boxes == [(0, 0, 40, 60), (20, 5, 60, 50), (50, 0, 90, 60), None]
    assert evaluate.concept_boxes(None, image, ["man"]) == [None]
