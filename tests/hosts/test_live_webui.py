"""Against a running WebUI (``--api``): set OMG_WEBUI_URL (e.g. http://127.0.0.1:7860) to run.

The WebUI needs the extension installed and two LoRAs for its checkpoint, named by
OMG_LORAS (default "char1,char2"); OMG_FOREIGN_LORA names a LoRA made for another architecture;
OMG_CONTROLNET names a ControlNet model of the checkpoint's family (the ControlNet tests are skipped without it).
Skipped when OMG_WEBUI_URL is not set.
"""
import base64
import io
import json
import os
import urllib.error
import urllib.request

import pytest

URL = os.environ.get("OMG_WEBUI_URL")
LORAS = os.environ.get("OMG_LORAS", "char1,char2").split(",")
CONTROLNET = os.environ.get("OMG_CONTROLNET")
IPADAPTER = os.environ.get("OMG_IPADAPTER")
"""An IP-Adapter model name (SD1.5, used with the host's "CLIP-ViT-H (IPAdapter)" preprocessor)."""
pytestmark = pytest.mark.skipif(not URL, reason="OMG_WEBUI_URL not set")

BASE = {"prompt": "a man and a woman hugging", "negative_prompt": "", "steps": 4, "width": 64, "height": 64,
        "sampler_name": "Euler", "cfg_scale": 7, "seed": 11}


def _omg(**changes):
    # text-encoder weight 0.5: the random test LoRAs at 1 overflow Forge Classic's half-precision CLIP (NaN, OMG or not)
    cfg = {"enabled": True, "blend_start": 0.32, "concepts": [
        {"lora": LORAS[0], "class_word": "man", "prompt": "a man, red jacket", "te_weight": 0.5},
        {"lora": LORAS[1], "class_word": "woman", "prompt": "a woman, blue dress", "te_weight": 0.5}]}
    cfg.update(changes)
    return {"alwayson_scripts": {"OMG multi-concept": {"args": [cfg]}}}


def _hires(**changes):
    """Hires fix at 1.5x and strength 0.5 with the host's first latent upscaler, or its plain resize ("None")
    where it has none (Forge Neo lists no latent modes); Forge's API needs ``hr_additional_modules``."""
    with urllib.request.urlopen(URL.rstrip("/") + "/sdapi/v1/latent-upscale-modes", timeout=60) as r:
        modes = [m["name"] for m in json.load(r)]
    return {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5, "hr_upscaler": modes[0] if modes else "None",
            "hr_additional_modules": ["Use same choices"], **changes}


def _post(path, payload):
    req = urllib.request.Request(URL.rstrip("/") + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return 200, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode() or "{}")


def test_disabled_changes_nothing():
    _, plain = _post("/sdapi/v1/txt2img", BASE)
    _, off = _post("/sdapi/v1/txt2img", {**BASE, **_omg(enabled=False)})
    assert base64.b64decode(plain["images"][0]) == base64.b64decode(off["images"][0])


def test_two_concepts_give_image_and_masks_with_infotext_and_the_layout_when_asked():
    status, result = _post("/sdapi/v1/txt2img", {**BASE, **_omg()})
    assert status == 200, result
    assert len(result["images"]) == 2  # final, masks over it
    status, with_layout = _post("/sdapi/v1/txt2img", {**BASE, **_omg(show_layout=True)})
    assert status == 200 and len(with_layout["images"]) == 3, with_layout  # final, layout, masks
    assert not any(_blank(_image(with_layout, i)) for i in range(3))  # no NaN anywhere
    assert _pixels(_image(with_layout)) == _pixels(_image(result))
    info = json.loads(result["info"])["infotexts"][0]
    assert f"OMG c1 lora: {LORAS[0]}" in info and "OMG blend start: 0.32" in info and "OMG c1 lora hash: " in info
    _, params = _post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + result["images"][0]})
    assert params["parameters"]["OMG c2 class"] == "woman"


def test_a_repeated_request_reuses_its_concepts_and_a_changed_concept_is_loaded_again():
    """The second of two equal requests takes its concepts from the first (``concept_cache``): the same image.
    A concept's weight changed, then back: another image, then the first one again (nothing stale kept)."""
    first, again = (_post("/sdapi/v1/txt2img", {**BASE, **_omg()})[1]["images"][0] for _ in range(2))
    assert base64.b64decode(first) == base64.b64decode(again)
    changed = _omg()
    changed["alwayson_scripts"]["OMG multi-concept"]["args"][0]["concepts"][0]["te_weight"] = _renderable_te_weight(LORAS[0])
    assert _post("/sdapi/v1/txt2img", {**BASE, **changed})[1]["images"][0] != first
    assert _post("/sdapi/v1/txt2img", {**BASE, **_omg()})[1]["images"][0] == first


def _renderable_te_weight(lora: str, candidates=(0.25, 0.75, 0.4)) -> float:
    """A text-encoder weight other than the suite's 0.5 at which the host itself renders the concept's prompt with
    ``lora`` (a plain job, no OMG): a random checkpoint and LoRA can overflow the host's CLIP at some weights (A1111's
    NaN check, or a black image), which says nothing about OMG. Skips, saying so, when none of ``candidates`` does."""
    for weight in candidates:
        status, result = _post("/sdapi/v1/txt2img", {**BASE, "prompt": f"a man, red jacket <lora:{lora}:{weight}:1>"})
        if status == 200 and not _blank(_image(result)):
            return weight
    pytest.skip(f"the host renders 'a man, red jacket' with {lora} at none of the text-encoder weights {candidates}")


def test_without_the_layout_and_masks_shown_the_job_gives_its_image_alone_and_the_same_image():
    _, shown = _post("/sdapi/v1/txt2img", {**BASE, **_omg()})
    status, hidden = _post("/sdapi/v1/txt2img", {**BASE, **_omg(show_masks=False)})
    assert status == 200 and len(hidden["images"]) == 1 and len(shown["images"]) == 2
    assert _pixels(_image(hidden)) == _pixels(_image(shown))  # the PNG info differs


@pytest.mark.parametrize("mode", ["fast", "one pass"])
def test_the_one_pass_modes_make_one_image_with_its_masks_and_leave_the_model_as_it_was(mode):
    _, before = _post("/sdapi/v1/txt2img", BASE)
    status, result = _post("/sdapi/v1/txt2img", {**BASE, **_hires(), **_omg(mode=mode)})
    assert status == 200, result
    assert len(result["images"]) == 2  # the image and its masks over it (no layout pass to show)
    assert f"OMG mode: {mode}" in json.loads(result["info"])["infotexts"][0]
    _, other = _post("/sdapi/v1/txt2img", {**BASE, **_hires(), **_omg(mode="fast" if mode == "one pass" else "one pass")})
    assert _image(other) != _image(result)  # concept rows of their own, not masked LoRAs in the host's rows
    status, result = _post("/sdapi/v1/txt2img", {**BASE, **_omg(mode=mode, mask_source="attention+sam")})
    assert status == 200, result  # SAM on the decoded denoised latent, or (no SAM file here) attention with a warning
    info = json.loads(result["info"])["infotexts"][0]
    assert 'OMG mask sources used: "attention+sam, attention+sam"' in info or "attention masks used instead" in info
    status, result = _post("/sdapi/v1/txt2img", {**BASE, **_omg(mode=mode, blend_start=0)})
    assert status == 422 and "blend start must be above 0" in json.dumps(result)
    _, after = _post("/sdapi/v1/txt2img", BASE)
    assert base64.b64decode(before["images"][0]) == base64.b64decode(after["images"][0])


def test_a_bad_lora_name_is_an_error_naming_it():
    status, result = _post("/sdapi/v1/txt2img", {**BASE, **_omg(concepts=[{"lora": "no_such_lora", "class_word": "man", "prompt": "a man"}])})
    assert status == 422 and "no_such_lora" in json.dumps(result)


def test_a_concept_whose_class_word_is_missing_is_skipped_and_the_rest_is_made():
    concepts = [{"lora": LORAS[0], "class_word": "man", "prompt": "a man, red jacket"},
                {"lora": LORAS[1], "class_word": "dog", "prompt": "a dog"}]
    status, result = _post("/sdapi/v1/txt2img", {**BASE, **_omg(concepts=concepts)})
    assert status == 200, result
    info = json.loads(result["info"])["infotexts"][0]
    assert "OMG concept 2 skipped: class word 'dog' does not appear in the prompt" in info



def test_the_mask_split_is_a_setting_of_the_api_and_comes_back_from_the_png_info():
    for split in ("figures", "pixels"):
        status, result = _post("/sdapi/v1/txt2img", {**BASE, **_omg(mask_split=split)})
        assert status == 200, result
        _, params = _post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + result["images"][0]})
        assert params["parameters"]["OMG mask split"] == split
    status, result = _post("/sdapi/v1/txt2img", {**BASE, **_omg(mask_split="halves")})
    assert status == 422 and "mask split must be one of figures, pixels" in json.dumps(result)


def test_drawn_regions_and_an_xyz_axis_of_omg_work_through_the_api():
    """Regions as the canvas writes them make the masks (no attention needed), and the host's X/Y/Z plot
    varies an OMG setting per cell: its script arguments are the host's own defaults (``/sdapi/v1/script-info``)
    with the X axis set to "[OMG] Blend start"."""
    regions = json.dumps({"width": 64, "height": 64, "boxes": {"1": [0, 0, 32, 64], "2": [32, 0, 64, 64]}})
    status, result = _post("/sdapi/v1/txt2img", {**BASE, **_omg(mask_source="regions", regions=regions)})
    assert status == 200, result
    info = json.loads(result["info"])["infotexts"][0]
    assert "OMG mask source: regions" in info and 'OMG mask sources used: "regions, regions"' in info
    with urllib.request.urlopen(URL.rstrip("/") + "/sdapi/v1/script-info", timeout=60) as r:
        xyz = next(s for s in json.load(r) if s["name"] == "x/y/z plot" and not s["is_img2img"])
    # the host's defaults as the script receives them: axis types as indices (the dropdowns' type), no dropdown values
    args = [a["choices"].index(a["value"]) if a["label"].endswith(" type") else [] if a["value"] is None else a["value"]
            for a in xyz["args"]]
    assert "[OMG] Mask split" in xyz["args"][0]["choices"]
    args[0], args[1] = xyz["args"][0]["choices"].index("[OMG] Blend start"), "0.25, 0.5"
    args[[a["label"] for a in xyz["args"]].index("Include Sub Images")] = True  # each cell's image with its infotext
    status, result = _post("/sdapi/v1/txt2img", {**BASE, **_omg(), "script_name": "x/y/z plot", "script_args": args})
    assert status == 200, result
    infotexts = json.loads(result["info"])["infotexts"]
    assert any("OMG blend start: 0.25" in t for t in infotexts) and any("OMG blend start: 0.5" in t for t in infotexts)

def test_interrupt_in_either_pass_leaves_the_model_as_it_was():
    import threading
    import time

    _, before = _post("/sdapi/v1/txt2img", BASE)
    for delay in (2.0, 14.0):  # with 12 steps at this size: during pass 1, then during pass 2
        job = threading.Thread(target=_post, args=("/sdapi/v1/txt2img", {**BASE, "steps": 12, **_omg()}))
        job.start()
        time.sleep(delay)
        _post("/sdapi/v1/interrupt", {})
        job.join()
    _, after = _post("/sdapi/v1/txt2img", BASE)
    assert base64.b64decode(before["images"][0]) == base64.b64decode(after["images"][0])


def test_omg_after_a_regional_prompter_job_runs_and_changes_only_as_the_hosts_own_image_changes():
    """Regional Prompter (when installed) leaves state behind (in Forge its UNet wrapper, idle from then on, and
    its own LoRA loader): OMG still runs after it, and its image changes only where the host's plain image
    changes too (what Regional Prompter left is then the host's, not OMG's)."""
    from benchmarks.bench_webui import regional_prompter_latent

    with urllib.request.urlopen(URL.rstrip("/") + "/sdapi/v1/scripts", timeout=60) as r:
        if "regional prompter" not in json.load(r)["txt2img"]:
            pytest.skip("Regional Prompter is not installed in this WebUI")
    _, plain_before = _post("/sdapi/v1/txt2img", BASE)
    _, before = _post("/sdapi/v1/txt2img", {**BASE, **_omg()})
    status, result = _post("/sdapi/v1/txt2img", {**BASE, **regional_prompter_latent(*LORAS)})
    assert status == 200, result
    status, after = _post("/sdapi/v1/txt2img", {**BASE, **_omg()})
    assert status == 200, after
    _, plain_after = _post("/sdapi/v1/txt2img", BASE)
    assert (_image(before) == _image(after)) == (_image(plain_before) == _image(plain_after))


@pytest.mark.skipif(not os.environ.get("OMG_FOREIGN_LORA"), reason="OMG_FOREIGN_LORA (a LoRA for another architecture) not set")
def test_a_lora_for_another_architecture_is_an_error():
    name = os.environ["OMG_FOREIGN_LORA"]
    status, result = _post("/sdapi/v1/txt2img", {**BASE, **_omg(concepts=[{"lora": name, "class_word": "man", "prompt": "a man"}])})
    assert status == 422 and "another architecture" in json.dumps(result)


def _hint_png(box=(12, 8, 36, 60)) -> str:
    """A 64x64 hint: a white figure-sized block on black, as a base64 PNG."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64))
    ImageDraw.Draw(image).rectangle(box, fill="white")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _controlnet_model(name=None) -> str:
    """The host's full name of a ControlNet-panel model ("name [hash]"): a wrong name is only logged by the hosts."""
    name = name or CONTROLNET
    with urllib.request.urlopen(URL.rstrip("/") + "/controlnet/model_list", timeout=60) as r:
        names = [n for n in json.load(r)["model_list"] if n.split(" [")[0] == name]
    assert names, f"ControlNet model {name} not in the host's list"
    return names[0]


def _no_preprocessor():
    """The host's name for "no preprocessor": "None" in Forge's ControlNet, "none" in sd-webui-controlnet."""
    with urllib.request.urlopen(URL.rstrip("/") + "/controlnet/module_list", timeout=60) as r:
        return next(m for m in json.load(r)["module_list"] if m.lower() == "none")


def _ip_adapter_preprocessor():
    """The host's CLIP-ViT-H preprocessor for SD1.5 IP-Adapters: "CLIP-ViT-H (IPAdapter)" in Forge's ControlNet,
    "ip-adapter_clip_sd15" (shown as "ip-adapter_clip_h") in sd-webui-controlnet."""
    with urllib.request.urlopen(URL.rstrip("/") + "/controlnet/module_list", timeout=60) as r:
        modules = json.load(r)["module_list"]
    return next(m for m in ("CLIP-ViT-H (IPAdapter)", "ip-adapter_clip_sd15", "ip-adapter_clip_h") if m in modules)


def _with_controlnet(payload, weight=1.0, **unit):
    unit = {"enabled": True, "module": _no_preprocessor(), "model": _controlnet_model(), "weight": weight, "image": _hint_png(), **unit}
    scripts = {**payload.get("alwayson_scripts", {}), "ControlNet": {"args": [unit]}}
    return {**payload, "alwayson_scripts": scripts}


def _image(result, i=0):
    return base64.b64decode(result["images"][i])


def _pixels(png: bytes) -> list:
    import io

    from PIL import Image

    return list(Image.open(io.BytesIO(png)).convert("RGB").getdata())


def _blank(png: bytes) -> bool:
    """One colour all over: what a NaN latent decodes to."""
    return len(set(_pixels(png))) == 1


@pytest.mark.skipif(not CONTROLNET, reason="OMG_CONTROLNET (a ControlNet model name) not set")
def test_controlnet_with_omg_disabled_is_bitwise_the_image_without_omg():
    _, no_control = _post("/sdapi/v1/txt2img", BASE)
    _, plain = _post("/sdapi/v1/txt2img", _with_controlnet(BASE))
    _, off = _post("/sdapi/v1/txt2img", _with_controlnet({**BASE, **_omg(enabled=False)}))
    assert _image(plain) == _image(off) and _image(plain) != _image(no_control)


@pytest.mark.skipif(not CONTROLNET, reason="OMG_CONTROLNET (a ControlNet model name) not set")
@pytest.mark.parametrize("mode", ["two passes", "one pass", "fast"])
def test_controlnet_acts_on_the_omg_image_in_a_batch_with_hires_and_the_model_comes_back(mode):
    _, before = _post("/sdapi/v1/txt2img", BASE)
    hires = _hires(batch_size=2)
    images = {}
    for weight in (0.0, 1.0):
        status, result = _post("/sdapi/v1/txt2img", _with_controlnet({**BASE, **hires, **_omg(mode=mode)}, weight))
        assert status == 200, result
        info = json.loads(result["info"])["infotexts"][0]
        assert f"OMG mode: {mode}" in info or mode == "two passes"
        images[weight] = _image(result)
    assert images[0.0] != images[1.0]  # the unit's weight still matters with OMG
    _, after = _post("/sdapi/v1/txt2img", BASE)
    assert _image(before) == _image(after)


@pytest.mark.skipif(not CONTROLNET, reason="OMG_CONTROLNET (a ControlNet model name) not set")
def test_a_controlnet_unit_reaches_the_concept_rows():
    """One concept whose drawn region is the whole image from the first step, with its own guidance: every pixel
    of the image comes from that concept's rows, so the unit's weight can only show through them."""
    whole = json.dumps({"width": 64, "height": 64, "boxes": {"1": [0, 0, 64, 64]}})
    omg = _omg(mask_source="regions", regions=whole, blend_start=0.0, concept_guidance="own", mask_dilation=0, mask_feather=0)
    settings = omg["alwayson_scripts"]["OMG multi-concept"]["args"][0]
    settings["concepts"] = settings["concepts"][:1]
    images = {}
    for weight in (0.0, 1.0):
        status, result = _post("/sdapi/v1/txt2img", _with_controlnet({**BASE, **omg}, weight))
        assert status == 200, result
        images[weight] = _image(result)
    assert images[0.0] != images[1.0]


def test_the_progress_bar_covers_both_passes_as_one_job_and_names_each_pass():
    """Polled while an OMG job runs: the progress never runs back for pass 2 and the text names the pass."""
    import threading
    import time

    job = threading.Thread(target=_post, args=("/sdapi/v1/txt2img", {**BASE, "steps": 12, **_omg()}))
    job.start()
    seen = []
    while job.is_alive():
        with urllib.request.urlopen(URL.rstrip("/") + "/sdapi/v1/progress?skip_current_image=true", timeout=60) as r:
            progress = json.load(r)
        if progress["state"]["job_count"] > 0:
            seen.append((progress["progress"], progress["textinfo"] or ""))
        time.sleep(0.2)
    job.join()
    texts = [text for _, text in seen]
    assert any("OMG pass 1 of 2" in t for t in texts) and any("OMG pass 2 of 2" in t for t in texts), texts
    values = [value for value, _ in seen if value > 0]
    assert all(b >= a - 0.02 for a, b in zip(values, values[1:])), values  # never back to the start for pass 2
    assert max(values) > 0.6, values


@pytest.mark.skipif(not CONTROLNET, reason="OMG_CONTROLNET (a ControlNet model name) not set")
def test_a_concepts_own_controlnet_unit_changes_the_image_and_a_missing_unit_is_named():
    units = [{"enabled": True, "module": _no_preprocessor(), "model": _controlnet_model(), "weight": 1.0, "image": _hint_png()},
             {"enabled": True, "module": _no_preprocessor(), "model": _controlnet_model(), "weight": 1.0, "image": _hint_png((30, 8, 56, 60))}]
    images = {}
    for unit in (-1, 1):
        payload = {**BASE, **_omg()}
        payload["alwayson_scripts"]["OMG multi-concept"]["args"][0]["concepts"][1]["control_unit"] = unit
        payload["alwayson_scripts"]["ControlNet"] = {"args": units}
        status, result = _post("/sdapi/v1/txt2img", payload)
        assert status == 200, result
        images[unit] = _image(result)
        if unit == 1:
            assert "OMG c2 control unit: 1" in json.loads(result["info"])["infotexts"][0]
    assert images[-1] != images[1]  # unit 1 on the woman's rows only, not on every row
    payload["alwayson_scripts"]["OMG multi-concept"]["args"][0]["concepts"][1]["control_unit"] = 2
    status, result = _post("/sdapi/v1/txt2img", payload)
    assert status == 422 and "ControlNet unit 2 is not enabled" in json.dumps(result)


def test_a_short_positional_request_says_what_the_positional_form_takes():
    status, result = _post("/sdapi/v1/txt2img", {**BASE, "alwayson_scripts": {"OMG multi-concept": {"args": [True, 0.3]}}})
    assert status == 422 and "OMG needs at least one concept" in json.dumps(result) and "positional values" in json.dumps(result)


def test_and_in_the_prompt_is_refused_with_what_to_do_and_runs_without_omg():
    status, result = _post("/sdapi/v1/txt2img", {**BASE, "prompt": "a man AND a woman", **_omg()})
    assert status == 422 and "does not take AND" in json.dumps(result) and "concept prompt" in json.dumps(result)
    status, result = _post("/sdapi/v1/txt2img", {**BASE, "prompt": "a man AND a woman", **_omg(enabled=False)})
    assert status == 200, result


def test_interrupt_or_skip_at_any_stage_of_a_hires_batch_job_leaves_the_model_as_it_was():
    """Interrupts spread over a job of two images (batch count 2) with hires fix — pass 1, mask making,
    pass 2, the hires pass, between the images — and a Skip: each job ends as the host ends one, and the
    next plain image is bitwise the one before."""
    import threading
    import time

    job = {**BASE, "steps": 8, "n_iter": 2, **_hires(), **_omg()}
    _, before = _post("/sdapi/v1/txt2img", BASE)
    start = time.perf_counter()
    status, result = _post("/sdapi/v1/txt2img", job)
    whole = time.perf_counter() - start
    assert status == 200 and len(result["images"]) >= 2, result
    for action, fraction in [("interrupt", f) for f in (0.1, 0.3, 0.45, 0.6, 0.8, 0.95)] + [("skip", 0.3)]:
        answers = []
        worker = threading.Thread(target=lambda: answers.append(_post("/sdapi/v1/txt2img", job)))
        worker.start()
        time.sleep(whole * fraction)
        _post(f"/sdapi/v1/{action}", {})
        worker.join()
        assert answers[0][0] == 200, (action, fraction, answers[0])
        _, after = _post("/sdapi/v1/txt2img", BASE)
        assert _image(before) == _image(after), (action, fraction)


@pytest.mark.skipif(not IPADAPTER, reason="OMG_IPADAPTER (an IP-Adapter model name) not set")
@pytest.mark.parametrize("mode", ["two passes", "fast"])
def test_an_ip_adapter_unit_acts_on_the_omg_image_and_omg_off_changes_nothing(mode):
    def with_ip(payload, box):
        unit = {"enabled": True, "module": _ip_adapter_preprocessor(), "model": _controlnet_model(IPADAPTER), "weight": 1.0,
                "image": _hint_png(box)}
        return {**payload, "alwayson_scripts": {**payload.get("alwayson_scripts", {}), "ControlNet": {"args": [unit]}}}

    omg = _omg(mode=mode)
    images = {}
    for box in ((12, 8, 36, 60), (30, 8, 56, 60)):  # two reference images: the same unit, the same memory plan
        status, result = _post("/sdapi/v1/txt2img", with_ip({**BASE, **omg}, box))
        assert status == 200, result
        images[box] = _image(result)
        assert not _blank(images[box])
    assert len(set(images.values())) == 2  # the image prompt still acts inside OMG's attention
    _, alone = _post("/sdapi/v1/txt2img", with_ip(BASE, (12, 8, 36, 60)))
    _, off = _post("/sdapi/v1/txt2img", with_ip({**BASE, **_omg(enabled=False)}, (12, 8, 36, 60)))
    assert _image(alone) == _image(off)


@pytest.mark.skipif(not IPADAPTER, reason="OMG_IPADAPTER (an IP-Adapter model name) not set")
def test_an_ip_adapter_unit_for_one_concept_changes_the_image_and_its_reference_image_acts_there():
    """Two IP-Adapter units (two reference images); unit 1 given to the woman alone: another image than unit 1
    on every row, and its reference image still matters."""
    def units(second_box):
        return [{"enabled": True, "module": _ip_adapter_preprocessor(), "model": _controlnet_model(IPADAPTER), "weight": 1.0,
                 "image": _hint_png(box)} for box in ((12, 8, 36, 60), second_box)]

    images = {}
    for unit, box in ((-1, (30, 8, 56, 60)), (1, (30, 8, 56, 60)), (1, (4, 30, 60, 56))):
        payload = {**BASE, **_omg()}
        payload["alwayson_scripts"]["OMG multi-concept"]["args"][0]["concepts"][1]["control_unit"] = unit
        payload["alwayson_scripts"]["ControlNet"] = {"args": units(box)}
        status, result = _post("/sdapi/v1/txt2img", payload)
        assert status == 200, result
        images[unit, box] = _image(result)
        assert not _blank(images[unit, box])
        if unit == 1:
            assert "OMG c2 control unit: 1" in json.loads(result["info"])["infotexts"][0]
    assert len(set(images.values())) == 3


def _merge(**changes):
    """``POST /omg/concepts/merge`` of the suite's two LoRAs (small pictures, few steps: a CPU test)."""
    body = {"loras": LORAS[:2], "output": "omg_live_merge", "triggers": ["a man, red jacket", "a woman, blue dress"],
            "method": "least squares", "size": 64, "record_steps": 2, **changes}
    return _post("/omg/concepts/merge", body)


@pytest.mark.parametrize("method, name", [("least squares", "omg_live_merge"), ("distil", "omg_live_merge_distil")])
def test_a_merged_lora_appears_in_the_list_loads_in_a_prompt_and_omg_takes_it_and_the_model_is_unchanged(method, name):
    with urllib.request.urlopen(URL.rstrip("/") + "/sdapi/v1/loras", timeout=60) as r:
        listed = [x["name"] for x in json.load(r)]
    if name in listed:
        pytest.skip(f"{name} exists from an earlier run: remove it from the LoRA folder to run this test")
    _, before = _post("/sdapi/v1/txt2img", BASE)
    _post("/sdapi/v1/txt2img", {**BASE, "prompt": f"a man <lora:{LORAS[0]}:1>"})  # a LoRA in the weights (Forge keeps it)
    status, result = _merge(method=method, output=name, distil_steps=2)
    assert status == 200, result
    assert result["lora"] == name and result["layers"] > 0 and result["method"] == method
    _, after = _post("/sdapi/v1/txt2img", BASE)
    assert base64.b64decode(before["images"][0]) == base64.b64decode(after["images"][0])  # the model as it was
    with urllib.request.urlopen(URL.rstrip("/") + "/sdapi/v1/loras", timeout=60) as r:
        assert name in [x["name"] for x in json.load(r)]
    status, loaded = _post("/sdapi/v1/txt2img", {**BASE, "prompt": f"a man and a woman <lora:{name}:1>"})
    assert status == 200 and base64.b64decode(loaded["images"][0]) != base64.b64decode(before["images"][0])
    concepts = [{"lora": name, "class_word": "man", "prompt": "a man, red jacket", "te_weight": 0.5},
                {"lora": name, "class_word": "woman", "prompt": "a woman, blue dress", "te_weight": 0.5}]
    status, result = _post("/sdapi/v1/txt2img", {**BASE, **_omg(concepts=concepts)})
    assert status == 200, result
    status, result = _merge(output=name)  # the name is now in use
    assert status == 422 and "already exists" in json.dumps(result)
    status, result = _merge(loras=LORAS[:1], output="omg_live_merge_one")
    assert status == 422 and "a merge takes 2 to 12 LoRAs" in json.dumps(result)


def _listed(path: str) -> list[str]:
    with urllib.request.urlopen(URL.rstrip("/") + path, timeout=60) as r:
        listed = json.load(r)
    return list(listed["loaded"]) if isinstance(listed, dict) else [x["name"] for x in listed]


def test_extracted_concepts_appear_in_both_lists_an_omg_job_uses_them_and_the_model_is_unchanged():
    if "omglivea" in _listed("/sdapi/v1/embeddings") + _listed("/sdapi/v1/loras"):
        pytest.skip("omglivea exists from an earlier run: remove it from the embeddings and LoRA folders to run this test")
    _, before = _post("/sdapi/v1/txt2img", BASE)
    body = {"images": before["images"][:1],
            "concepts": [{"name": "omglivea", "class_word": "man", "boxes": [[0, 0, 32, 64]]},
                         {"name": "omgliveb", "class_word": "woman"}],
            "settings": {"rounds": 1, "steps": 2, "lora": True}}
    status, result = _post("/omg/concepts/extract", body)
    if status == 404:
        pytest.skip("this WebUI has no /omg/concepts/extract")
    assert status == 200, result
    assert result["embeddings"] == ["omglivea", "omgliveb"] and result["loras"] == ["omglivea", "omgliveb"]
    _, after = _post("/sdapi/v1/txt2img", BASE)
    assert base64.b64decode(before["images"][0]) == base64.b64decode(after["images"][0])  # the model as it was
    assert {"omglivea", "omgliveb"} <= set(_listed("/sdapi/v1/embeddings"))
    assert {"omglivea", "omgliveb"} <= set(_listed("/sdapi/v1/loras"))
    status, plain_embedding = _post("/sdapi/v1/txt2img", {**BASE, "prompt": "a omglivea man and a woman hugging"})
    assert status == 200 and base64.b64decode(plain_embedding["images"][0]) != base64.b64decode(before["images"][0])
    concepts = [{"lora": name, "class_word": word, "prompt": prompt, "te_weight": 0.5}
                for name, word, prompt in zip(result["loras"], result["class_words"], result["concept_prompts"])]
    status, omg = _post("/sdapi/v1/txt2img", {**BASE, **_omg(concepts=concepts)})
    assert status == 200, omg
    assert "omglivea" in omg["info"]
    _, again = _post("/sdapi/v1/txt2img", BASE)
    assert base64.b64decode(again["images"][0]) == base64.b64decode(before["images"][0])
    status, result = _post("/omg/concepts/extract", body)  # the names are now in use
    assert status == 422 and "already exists" in json.dumps(result)
    status, result = _post("/omg/concepts/extract", {**body, "images": []})
    assert status == 422 and "give 1 to 4 pictures" in json.dumps(result)


def _init_image(width=96, height=64) -> str:
    """A picture of the WebUI's own (a plain job at the img2img size), base64 PNG: the init image."""
    _, made = _post("/sdapi/v1/txt2img", {**BASE, "width": width, "height": height})
    return made["images"][0]


def _mask_left_half(width=96, height=64) -> str:
    """An inpaint mask, white (repainted) on the left half, as base64 PNG."""
    from PIL import Image

    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 2, height))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_img2img_with_omg_runs_disabled_changes_nothing_and_inpainting_names_a_concept_outside_the_mask():
    init = _init_image()
    job = {**BASE, "width": 96, "height": 64, "init_images": [init], "denoising_strength": 0.75, "steps": 8}
    _, plain = _post("/sdapi/v1/img2img", job)
    _, off = _post("/sdapi/v1/img2img", {**job, **_omg(enabled=False)})
    assert base64.b64decode(plain["images"][0]) == base64.b64decode(off["images"][0])
    status, on = _post("/sdapi/v1/img2img", {**job, **_omg()})
    assert status == 200, on
    info = json.loads(on["info"])["infotexts"][0]
    assert "OMG: True" in info and "Denoising strength: 0.75" in info
    assert base64.b64decode(on["images"][0]) != base64.b64decode(plain["images"][0])
    regions = json.dumps({"width": 96, "height": 64, "boxes": {"1": [0, 0, 48, 64], "2": [48, 0, 96, 64]}})
    status, inpainted = _post("/sdapi/v1/img2img", {**job, "mask": _mask_left_half(), "mask_blur": 0, "inpainting_fill": 1,
                                                     "inpaint_full_res": False,
                                                     **_omg(mask_source="regions", regions=regions, mask_dilation=0, mask_feather=0)})
    assert status == 200, inpainted
    assert "OMG concept 2 not drawn: its mask lies outside the inpaint area" in json.loads(inpainted["info"])["infotexts"][0]
    status, refused = _post("/sdapi/v1/img2img", {**job, "denoising_strength": 0.1, **_omg(blend_start=0.9)})
    assert status == 422 and "no step would be blended" in json.dumps(refused)
