"""Mask sources beyond attention: SAM prompts, detections to concepts, user regions, model files, fallbacks."""
import io
import json
import urllib.error

import numpy
import pytest
import torch

from omg_ext.masks import box_assign, detector, model_files, regions, sources
from omg_ext.masks.sources import MaskInputs, MaskModels, concept_masks
from omg_ext.masks.model_files import MissingModelFile, ModelFile, ensure_file
from omg_ext.masks.sam_prompts import prompts_from_attention
from omg_ext.masks.segment import SamPrompt, load_sam, segment
from minisd.mask_models import save_to_hf_cache, tiny_grounding_dino, tiny_owlv2, tiny_owlvit, tiny_sam

LATENT = (8, 12)  # image 64 x 96


def _blob(y0, y1, x0, x1, peak=None, hw=LATENT):
    m = torch.zeros(hw)
    m[y0:y1, x0:x1] = 0.5
    if peak:
        m[peak] = 1.0
    return m


def test_prompts_from_attention_are_the_core_box_its_peak_and_neighbours_peaks():
    masks = (torch.stack([_blob(1, 7, 1, 7), _blob(2, 6, 7, 11)]) > 0).float()
    evidence = torch.stack([_blob(1, 7, 1, 7, peak=(3, 2)), _blob(2, 6, 7, 11, peak=(4, 8))])
    first, second = prompts_from_attention(masks, evidence, (64, 96))
    assert first.box == (8.0, 8.0, 56.0, 56.0) and first.points == [(20.0, 28.0)] and first.labels == [1]
    assert second.box == (56.0, 16.0, 88.0, 48.0) and second.points == [(68.0, 36.0)] and second.labels == [1]
    # hugging: the second core reaches into the first's box, its peak becomes a negative point there
    masks[1, 3:5, 5:7] = 1
    evidence[1] = 0
    evidence[1, 4, 5] = 1
    first, second = prompts_from_attention(masks, evidence, (64, 96))
    assert first.points == [(20.0, 28.0), (44.0, 36.0)] and first.labels == [1, 0]
    assert prompts_from_attention(torch.zeros(1, 8, 12), torch.zeros(1, 8, 12), (64, 96)) == [None]


def test_boxes_go_to_concepts_left_to_right_or_by_attention_when_clear():
    left, right = (0.0, 0.0, 40.0, 64.0), (50.0, 0.0, 96.0, 64.0)
    detections = [(0.9, right), (0.8, left), (0.7, (1.0, 1.0, 41.0, 63.0))]  # the third is the left one again
    assert box_assign.distinct(detections, 2) == [right, left]
    attention = torch.stack([_blob(0, 8, 7, 12), _blob(0, 8, 0, 5)])  # concept 0 looks right, concept 1 left
    labels = ["man", "man"]
    chosen, notes = box_assign.assign([0, 1], [right, left], attention, (64, 96), "left_to_right", labels)
    assert chosen == {0: left, 1: right} and notes == []
    chosen, notes = box_assign.assign([0, 1], [right, left], attention, (64, 96), "attention", labels)
    assert chosen == {0: right, 1: left} and notes == []
    same = torch.stack([_blob(0, 8, 0, 12), _blob(0, 8, 0, 12) * 1.0])
    same[0, :, 6] += 0.2  # a hair more on the right: not a clear signal
    chosen, notes = box_assign.assign([0, 1], [right, left], same, (64, 96), "attention", labels)
    assert chosen == {0: left, 1: right} and "assigned left to right" in notes[0]
    chosen, notes = box_assign.assign([0, 1], [left], attention, (64, 96), "attention", labels)
    assert chosen == {0: left} and notes == ["man: the detector found 1 box(es) for 2 concept(s)"]
    with pytest.raises(ValueError, match="instance order must be one of"):
        box_assign.assign([0], [left], attention, (64, 96), "random", labels)


class BoxSam:
    """A deterministic stand-in with SAM's interface: each prompt's mask is its box (or a fixed mask)."""

    def __init__(self, override=None):
        self.calls, self.override = [], override

    def __call__(self, image, prompts):
        self.calls.append(prompts)
        out = []
        for p in prompts:
            m = torch.zeros(image.shape[:2], dtype=torch.bool)
            x0, y0, x1, y1 = (int(round(v)) for v in p.box)
            m[y0:y1, x0:x1] = True
            out.append(self.override if self.override is not None else m)
        return out


def _inputs(**kw):
    attention = torch.stack([_blob(1, 7, 1, 6, peak=(3, 3)), _blob(1, 7, 7, 11, peak=(3, 8))])
    base = dict(attention=attention, latent_hw=LATENT, labels=["man", "woman"], image=numpy.zeros((64, 96, 3), numpy.uint8))
    return MaskInputs(**{**base, **kw})


def _check_exclusive(result, k=2):
    assert result.masks.shape == (k, *LATENT)
    assert float(result.masks.min()) >= 0 and float(result.masks.sum(0).max()) <= 1


@pytest.mark.parametrize("groups", [[], [[0, 1]]], ids=["three words", "two men"])
def test_the_attention_source_gives_exactly_the_engines_attention_masks(groups):
    from omg_ext.engine.masks import masks_from_attention

    labels = ["man", "man", "dog"] if groups else ["man", "woman", "dog"]
    for seed in range(5):
        maps = torch.rand(3, 8, 12, generator=torch.Generator().manual_seed(seed)) ** 3
        engine = masks_from_attention(maps, (16, 24), groups=groups, dilation=16, feather=8, order="attention", labels=labels)
        source = concept_masks("attention", MaskInputs(maps, (16, 24), labels, groups=groups, order="attention",
                                                       dilation=16, feather=8))
        assert torch.equal(source.masks, engine.masks) and source.notes == engine.notes
        assert source.sources == ["attention"] * 3


def test_attention_plus_sam_uses_sam_and_keeps_attention_where_they_disagree():
    sam = BoxSam()
    result = concept_masks("attention+sam", _inputs(), MaskModels(sam=lambda: sam))
    _check_exclusive(result)
    assert result.sources == ["attention+sam", "attention+sam"] and len(sam.calls[0]) == 2
    assert sam.calls[0][0].box == (8.0, 8.0, 48.0, 56.0)  # from the attention core
    assert bool(result.masks[0, 1:7, 1:6].eq(1).all()) and bool(result.masks[1, 1:7, 7:11].eq(1).all())
    far = torch.zeros(64, 96, dtype=torch.bool)
    far[56:, :8] = True  # a corner nowhere near either character
    result = concept_masks("attention+sam", _inputs(), MaskModels(sam=lambda: BoxSam(far)))
    assert result.sources == ["attention (SAM disagreed)"] * 2
    assert "concept 1 ('man'): SAM disagrees with the attention (IoU 0.00), attention mask kept" in result.notes
    attention_only = concept_masks("attention", _inputs())
    torch.testing.assert_close(result.masks, attention_only.masks)
    assert attention_only.sources == ["attention", "attention"]


def test_a_missing_model_falls_back_to_attention_with_the_message():
    def missing():
        raise MissingModelFile("OMG: sam_vit_b_01ec64.pth is missing: download https://x and place it in /m/sam")
    result = concept_masks("attention+sam", _inputs(), MaskModels(sam=missing))
    torch.testing.assert_close(result.masks, concept_masks("attention", _inputs()).masks)
    assert result.sources == ["attention (fallback)"] * 2
    assert any("place it in /m/sam" in n and "attention masks used instead" in n for n in result.notes)


class _FailingDetector:
    def detect(self, image, words):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("source, models", [
    ("detector+sam", MaskModels(sam=lambda: BoxSam(), detector=lambda: _FailingDetector())),
    ("attention+sam", MaskModels(sam=lambda: (lambda image, prompts: [][0]))),  # SAM itself raises IndexError
])
def test_a_model_failing_at_run_time_falls_back_to_attention_and_says_so(source, models, caplog):
    result = concept_masks(source, _inputs(), models)
    assert torch.equal(result.masks, concept_masks("attention", _inputs()).masks)
    assert result.sources == ["attention (fallback)"] * 2
    error = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB" if source == "detector+sam" else "IndexError: list index out of range"
    assert f"OMG: {source} failed ({error}) — attention masks used instead" in result.warnings()
    assert f"OMG: mask source {source} failed" in caplog.text and "Traceback" in caplog.text  # the console has the details


def test_regions_as_they_are_and_as_sam_prompts():
    drawn = regions.parse_regions(json.dumps({"width": 192, "height": 128, "boxes": {"2": [96, 0, 192, 128], "1": [0, 32, 64, 96]}}), 2)
    result = concept_masks("regions", _inputs(regions=drawn))
    _check_exclusive(result)
    expected0 = torch.zeros(LATENT)
    expected0[2:6, 0:4] = 1
    expected1 = torch.zeros(LATENT)
    expected1[:, 6:] = 1
    torch.testing.assert_close(result.masks, torch.stack([expected0, expected1]))
    assert result.sources == ["regions", "regions"]
    sam = BoxSam()
    result = concept_masks("regions+sam", _inputs(regions=drawn), MaskModels(sam=lambda: sam))
    assert [p.box for p in sam.calls[0]] == [(48.0, 0.0, 96.0, 64.0), (0.0, 16.0, 32.0, 48.0)]  # canvas -> image pixels
    assert result.sources == ["regions+sam", "regions+sam"]
    only_one = regions.parse_regions(json.dumps({"width": 96, "height": 64, "boxes": {"1": [0, 0, 48, 64]}}), 2)
    result = concept_masks("regions", _inputs(regions=only_one))
    assert result.sources == ["regions", "attention (fallback)"] and "concept 2 ('woman'): regions gave no mask, attention mask used" in result.notes
    result = concept_masks("regions", _inputs())
    assert result.sources == ["attention (fallback)"] * 2 and any("no regions were drawn" in n for n in result.notes)


class StubDetector:
    def __init__(self, found):
        self.found, self.words = found, None

    def detect(self, image, words):
        self.words = words
        return self.found


def test_detector_plus_sam_gives_two_men_distinct_instances():
    left, right = (0.0, 0.0, 40.0, 64.0), (56.0, 0.0, 96.0, 64.0)
    stub = StubDetector({"man": [(0.9, right), (0.8, left)]})
    attention = torch.stack([_blob(0, 8, 7, 12, peak=(3, 9)), _blob(0, 8, 0, 5, peak=(3, 2))])  # 1st man right, 2nd left
    sam = BoxSam()
    inputs = _inputs(attention=attention, labels=["man", "man"], groups=[[0, 1]])
    result = concept_masks("detector+sam", inputs, MaskModels(sam=lambda: sam, detector=lambda: stub))
    assert stub.words == ["man"] and result.sources == ["detector+sam"] * 2
    assert [p.box for p in sam.calls[0]] == [right, left]
    assert float(result.masks[0, :, 7:].mean()) == 1.0 and float(result.masks[1, :, :5].mean()) == 1.0
    inputs.order = "left_to_right"
    sam = BoxSam()
    concept_masks("detector+sam", inputs, MaskModels(sam=lambda: sam, detector=lambda: stub))
    assert [p.box for p in sam.calls[0]] == [left, right]
    result = concept_masks("detector+sam", inputs, MaskModels(sam=lambda: sam, detector=lambda: StubDetector({})))
    assert result.sources == ["attention (fallback)"] * 2 and "man, man: the detector found 0 box(es) for 2 concept(s)" in result.notes


DETECTORS = [("owlvit", tiny_owlvit), ("owlv2", tiny_owlv2), ("grounding-dino", tiny_grounding_dino)]


def _expected_detections(backend, processor, call, hw):
    """Every box of the model's raw output as (word, score, box in pixels), computed apart from ``Detector``."""
    (_, kwargs), out = call
    h, w = hw
    if backend == "grounding-dino":  # the best-scoring token that is one of the words (by token id, not position)
        ids = kwargs["input_ids"][0]
        word_of = {processor.tokenizer.convert_tokens_to_ids(word): word for word in ("man", "woman")}
        columns = [i for i, t in enumerate(ids.tolist()) if t in word_of]
        scores, best = out.logits[0][:, columns].sigmoid().max(-1)
        labels = [word_of[int(ids[columns[b]])] for b in best]
        scale = torch.tensor([w, h, w, h])
    else:  # one logit per query word; OWLv2 pads the image to a square at the bottom right
        scores, best = out.logits[0].sigmoid().max(-1)
        labels = [["man", "woman"][b] for b in best]
        scale = torch.tensor([w, h, w, h]) if backend == "owlvit" else torch.tensor([max(h, w)] * 4)
    cx, cy, bw, bh = out.pred_boxes[0].unbind(-1)
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * scale
    return sorted((word, float(s), tuple(b.tolist())) for word, s, b in zip(labels, scores, boxes))


@pytest.mark.parametrize("backend, build", DETECTORS, ids=[d[0] for d in DETECTORS])
def test_each_detector_built_from_its_real_code_labels_and_scales_its_boxes(tmp_path, backend, build):
    processor, model = build(tmp_path)
    calls = []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append(((args, kwargs), out)), with_kwargs=True)
    image = (numpy.random.default_rng(0).random((64, 96, 3)) * 255).astype(numpy.uint8)
    found = detector.Detector(backend, processor, model).detect(image, ["man", "woman"], threshold=0.0)
    got = sorted((word, score, box) for word, hits in found.items() for score, box in hits)
    expected = _expected_detections(backend, processor, calls[0], (64, 96))
    assert set(found) == {"man", "woman"} and len(got) == len(expected) > 0
    assert [g[0] for g in got] == [e[0] for e in expected]
    assert numpy.allclose([g[1:2] + g[2] for g in got], [e[1:2] + e[2] for e in expected], atol=1e-4)
    few = detector.Detector(backend, processor, model).detect(image, ["man", "woman"], threshold=0.5)
    assert sum(map(len, few.values())) == sum(e[1] > 0.5 for e in expected)


@pytest.mark.parametrize("backend, build", DETECTORS, ids=[d[0] for d in DETECTORS])
def test_a_real_random_weight_sam_and_detector_run_the_whole_path(tmp_path, backend, build):
    sam = tiny_sam()
    image = (numpy.random.default_rng(0).random((64, 96, 3)) * 255).astype(numpy.uint8)
    masks = segment(sam, image, [SamPrompt((8, 8, 48, 56), [(20, 28)], [1]), SamPrompt((56, 8, 88, 56))])
    assert [tuple(m.shape) for m in masks] == [(64, 96)] * 2 and masks[0].dtype == torch.bool
    processor, model = build(tmp_path)
    prompts_seen = []

    def real_sam(img, prompts):
        prompts_seen.extend(prompts)
        return segment(sam, img, prompts)

    found = detector.Detector(backend, processor, model)
    result = concept_masks("detector+sam", _inputs(image=image), MaskModels(sam=lambda: real_sam, detector=lambda: found))
    _check_exclusive(result)
    assert result.sources == ["detector+sam"] * 2 and len(prompts_seen) == 2
    assert all(p.box is not None and p.points == [] for p in prompts_seen)


def test_sam_checkpoints_load_as_tensors_only(tmp_path, monkeypatch):
    import segment_anything

    sam = tiny_sam()
    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", lambda checkpoint=None: tiny_sam().apply(_scramble))
    torch.save(sam.state_dict(), tmp_path / "ok.pth")
    loaded = load_sam("vit_b", tmp_path / "ok.pth")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), sam.state_dict().values()))
    torch.save({"weights": sam.state_dict(), "hook": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(MissingModelFile, match="Weights only load failed|Unsupported global"):
        load_sam("vit_b", tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="SAM model must be one of vit_b, vit_l, vit_h"):
        load_sam("vit_x", tmp_path / "ok.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "ok.pth").read_bytes()[:5000])  # an interrupted manual copy
    with pytest.raises(MissingModelFile, match=r"cut.pth could not be read as a SAM vit_b checkpoint .*replace it with the official file"):
        load_sam("vit_b", tmp_path / "cut.pth")
    torch.save({"other": torch.zeros(2)}, tmp_path / "other.pth")  # some other model's file under SAM's name
    with pytest.raises(MissingModelFile, match=r"other.pth could not be read as a SAM vit_b checkpoint \(RuntimeError"):
        load_sam("vit_b", tmp_path / "other.pth")
    monkeypatch.setattr(torch, "load", lambda *a, **k: None)  # A1111's safe-unpickle wrapper refusing a file
    with pytest.raises(MissingModelFile, match=r"ok.pth could not be read as a SAM vit_b checkpoint \(ValueError: not a state dict"):
        load_sam("vit_b", tmp_path / "ok.pth")


class Evil:
    def __reduce__(self):
        return (print, ("arbitrary code",))


def _scramble(module):
    for p in module.parameters(recurse=False):
        p.data.normal_()


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_model_files_download_with_checksum_or_say_where_to_put_them(tmp_path):
    payload = b"sam weights" * 1000
    import hashlib
    good = ModelFile("sam_test.pth", "https://example/sam_test.pth", hashlib.sha256(payload).hexdigest(), len(payload))
    path = ensure_file(good, tmp_path / "sam", opener=lambda url: _Response(payload))
    assert path == tmp_path / "sam" / "sam_test.pth" and path.read_bytes() == payload
    assert ensure_file(good, tmp_path / "sam", opener=None) == path  # present: no download
    bad = ModelFile("other.pth", "https://example/other.pth", "0" * 64, len(payload))
    with pytest.raises(MissingModelFile, match=r"download of other.pth is corrupt .*place it in .*sam"):
        ensure_file(bad, tmp_path / "sam", opener=lambda url: _Response(payload))
    assert sorted(p.name for p in (tmp_path / "sam").iterdir()) == ["sam_test.pth"]  # nothing half-written left

    def offline(url):
        raise urllib.error.URLError("Name or service not known")
    with pytest.raises(MissingModelFile, match=r"other.pth is missing and could not be downloaded .*download https://example/other.pth and place it in"):
        ensure_file(bad, tmp_path / "sam", opener=offline)
    with pytest.raises(MissingModelFile, match=r"OMG: other.pth is missing: download"):
        ensure_file(bad, tmp_path / "sam", download=False)
    assert model_files.SAM_FILES["vit_b"].sha256.startswith("ec2df627") and model_files.SAM_FILES["vit_h"].name == "sam_vit_h_4b8939.pth"


def test_the_detector_is_the_best_the_installed_transformers_has(monkeypatch):
    from omg_ext.config import DETECTORS, SAM_MODELS

    assert DETECTORS == ("auto", *detector.BACKENDS) and tuple(model_files.SAM_FILES) == SAM_MODELS  # the UI's choices
    import transformers

    assert detector.available_backend() == "grounding-dino"
    assert detector.available_backend("owlv2") == "owlv2"
    for cls in ("GroundingDinoForObjectDetection", "Owlv2ForObjectDetection"):  # A1111's transformers 4.30.2
        monkeypatch.setattr(transformers, cls, None)
    assert detector.available_backend("grounding-dino") == "owlvit"
    with pytest.raises(ValueError, match="detector must be one of auto, grounding-dino, owlv2, owlvit"):
        detector.available_backend("yolo")


def test_region_json_and_mask_images_parse_exactly_or_say_what_is_wrong():
    for text, message in (("{", "not valid JSON"), ('{"width": 0, "height": 5, "boxes": {}}', "width and height must be positive"),
                          ('{"width": 8, "height": 8, "boxes": {"7": [0, 0, 1, 1]}}', "'7' is not a concept number"),
                          ('{"width": 8, "height": 8, "boxes": {"1": [4, 0, 2, 1]}}', "empty or outside the 8x8 canvas"),
                          ('{"width": 8, "height": 8, "boxes": {"1": [0, 0, 9, 1]}}', "empty or outside"),
                          # decompression bombs: a few bytes of run lengths that would become gigabytes of pixels
                          ('{"width": 100000, "height": 100000, "mask_size": [100000, 100000], "masks": {"1": "0 10000000000"}}',
                           "the canvas is 100000x100000; at most 8192 pixels a side"),
                          ('{"width": 64, "height": 64, "mask_size": [60000, 60000], "masks": {"1": "0 3600000000"}}',
                           r"mask_size \[60000, 60000\] is larger than the 64x64 canvas")):
        with pytest.raises(ValueError, match=message):
            regions.parse_regions(text, 2)
    image = numpy.zeros((16, 24, 4), numpy.uint8)
    image[..., 3] = 255
    image[0:8, 0:8, :3] = regions.PALETTE_RGB[0].numpy()
    image[8:16, 16:24, :3] = regions.PALETTE_RGB[1].numpy() - 10  # close enough: antialiasing / JPEG
    image[0:4, 20:24] = [255, 255, 255, 255]  # background
    masks = regions.masks_from_image(image, 2)
    assert int(masks[0].sum()) == 64 and int(masks[1].sum()) == 64 and not bool(masks[:, 0:4, 20:24].any())
    parsed = regions.parse_regions(regions.regions_from_image(image, 2), 2)
    assert parsed.canvas_hw == (16, 24) and parsed.masks[0].shape == (2, 3)
    assert parsed.masks[0].tolist() == [[True, False, False], [False, False, False]]
    assert parsed.masks[1].tolist() == [[False, False, False], [False, False, True]]
    image[5, 5, :3] = [10, 200, 10]  # green is concept 3's colour, and there are two concepts
    with pytest.raises(ValueError, match=r"colour \(10, 200, 10\) at \(5, 5\) is not one of the first 2 concept colours"):
        regions.masks_from_image(image, 2)
    with pytest.raises(ValueError, match="mask does not cover 2x3 pixels"):
        regions.parse_regions(json.dumps({"width": 24, "height": 16, "mask_size": [2, 3], "masks": {"1": "1 2"}}), 2)
    assert regions.decode_runs(regions.encode_runs(masks[0]), (16, 24)).equal(masks[0])


def test_mask_source_names_are_validated():
    with pytest.raises(ValueError, match="mask source must be one of attention, attention\\+sam"):
        concept_masks("sam", _inputs())
    assert sources.MASK_SOURCES[0] == "attention"


def test_the_accordion_says_which_model_files_the_source_needs_and_where(tmp_path, monkeypatch):
    from omg_ext.masks.model_status import describe_model_files

    sam, det = tmp_path / "sam", tmp_path / "omg-detectors"
    say = lambda source, sam_model="vit_b", detector_name="auto", download=True: describe_model_files(  # noqa: E731
        source, sam_model, detector_name, sam, det, download)
    assert say("attention") == "The attention mask source needs no model file."
    assert say("regions") == "The regions mask source needs no model file."
    assert f"`sam_vit_h_4b8939.pth` (2446 MB) is not in `{sam}` yet; it is downloaded from " \
           "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth on first use" in say("regions+sam", "vit_h")
    assert f"download https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth and place it in `{sam}` " \
           "(downloads are off" in say("attention+sam", download=False)
    sam.mkdir()
    (sam / "sam_vit_b_01ec64.pth").write_bytes(b"x")
    assert say("attention+sam") == f"Segment Anything vit_b: `{sam / 'sam_vit_b_01ec64.pth'}`"
    monkeypatch.setattr("omg_ext.masks.model_status.available_backend", lambda preferred: "owlvit")  # as on A1111's 4.30
    assert "Detector: owlvit (the installed transformers has no grounding-dino); download " \
           f"https://huggingface.co/google/owlvit-base-patch32 into `{det}` (downloads are off" in \
           say("detector+sam", detector_name="grounding-dino", download=False)
    snapshot = det / "models--google--owlvit-base-patch32" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert say("detector+sam") == f"Segment Anything vit_b: `{sam / 'sam_vit_b_01ec64.pth'}`\n\n" \
                                  f"Detector: owlvit, `google/owlvit-base-patch32` in `{det}`"


@pytest.mark.parametrize("backend, build", DETECTORS, ids=[d[0] for d in DETECTORS])
def test_a_detector_in_the_models_folder_loads_offline_or_falls_back_with_a_message(tmp_path, monkeypatch, backend, build):
    processor, model = build(tmp_path)
    folder = tmp_path / "omg-detectors"
    with pytest.raises(MissingModelFile, match=rf"the {backend} detector \(.*\) is not in .*omg-detectors and could not be "
                                               rf"downloaded .*download it from https://huggingface.co/{detector.BACKENDS[backend][1]}"):
        detector.load_detector(backend, folder, local_only=True)
    save_to_hf_cache(processor, model, detector.BACKENDS[backend][1], folder, safetensors=False)
    loaded = detector.load_detector(backend, folder, local_only=True)
    assert loaded.backend == backend and not loaded.model.training
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()))
    image = (numpy.random.default_rng(0).random((64, 96, 3)) * 255).astype(numpy.uint8)
    assert loaded.detect(image, ["man", "woman"]) == detector.Detector(backend, processor, model).detect(image, ["man", "woman"])
    monkeypatch.setattr(torch, "load", lambda *a, **k: None)  # A1111's safe unpickler refusing pytorch_model.bin
    with pytest.raises(MissingModelFile, match=rf"the {backend} detector in .*omg-detectors could not be loaded \(.*see the console\)"):
        detector.load_detector(backend, folder, local_only=True)


def test_regions_cropped_to_a_part_of_the_picture_keep_what_lies_inside_it_in_the_crops_pixels():
    from omg_ext.masks.regions import Regions, cropped

    mask = torch.zeros(12, 20, dtype=torch.bool)
    mask[6:, 10:] = True  # the bottom-right quarter, on a 20x12 mask of a 160x96 picture
    regions = Regions((48, 80), boxes={0: (0, 0, 40, 24), 1: (20, 12, 80, 48)}, masks={2: mask})  # a half-size canvas
    inside = cropped(regions, (160, 96), (80, 48, 80, 48))
    assert inside.canvas_hw == (48, 80)
    assert inside.boxes == {1: (0, 0, 80, 48)}  # box 0 (the top-left quarter) lies outside
    assert torch.equal(inside.masks[2], torch.ones(6, 10, dtype=torch.bool))
    assert cropped(regions, (160, 96), (0, 0, 40, 24)).boxes == {0: (0, 0, 40, 24)}
