"""Extracting concepts on the A1111 stand-in's model: the embeddings (and LoRAs) written to the host's folders
and read back by the stand-in of its loader, the model and the embedding database exactly as they were after
success, an error and an Interrupt, and bad input named without touching the user's files."""
import base64
import contextlib
import io
import json
import sys
import types

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch import nn

from minisd.sampling import DiscreteSchedule
from minisd.unet import TinyUNet
from omg_ext.hosts import extract_ui
from omg_ext.hosts.extract_a1111 import A1111Extract
from omg_ext.hosts.errors import OmgUserError
from omg_ext.hosts.extract_request import ExtractRequest
from tests.support import fake_a1111
from tests.support.fake_a1111.embedding_clip import CTX, EmbeddingClip
from tests.support.fake_a1111 import networks as fake_networks

class _Model:
    is_sdxl = False

    def __init__(self):
        self.model = types.SimpleNamespace(diffusion_model=TinyUNet(context_dim=CTX, channel_mult=(1, 2), seed=0).eval())
        self.cond_stage_model = EmbeddingClip()
        self.alphas_cumprod = DiscreteSchedule().alphas_cumprod

    def encode_first_stage(self, x):  # the stand-in VAE: 8x smaller, four channels
        x = nn.functional.avg_pool2d(x, 8)
        return torch.cat([x, x.mean(1, keepdim=True)], 1)

    def get_first_stage_encoding(self, z):
        return z * 0.5


@contextlib.contextmanager
def a1111_with(model, tmp_path, monkeypatch):
    """The A1111 stand-in with ``model`` loaded, its embeddings and LoRA folders in ``tmp_path``: its modules."""
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "Lora").mkdir()
    with fake_a1111.installed() as modules:
        modules.shared.sd_model = model
        modules.shared.cmd_opts.embeddings_dir = str(tmp_path / "embeddings")
        modules.shared.cmd_opts.lora_dir = str(tmp_path / "Lora")
        modules.sd_hijack.model_hijack.embedding_db = modules.textual_inversion.textual_inversion.EmbeddingDatabase()
        monkeypatch.setitem(sys.modules, "networks", fake_networks)
        fake_networks.list_available_networks()
        try:
            yield modules
        finally:
            modules.shared.state.interrupted = False  # the stand-in's state outlives the test


@pytest.fixture
def host(tmp_path, monkeypatch):
    model = _Model()
    with a1111_with(model, tmp_path, monkeypatch) as modules:
        yield model, modules, tmp_path


def _picture(seed=0, size=(96, 64), mode="RGB"):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy()
    return Image.fromarray(pixels).convert(mode)


def _request(**change):
    body = dict(images=[_picture()], concepts=[{"name": "xzorb", "class_word": "man"}, {"name": "xquix", "class_word": "woman"}],
                settings=dict(rounds=1, steps=2))
    body.update(change)
    return ExtractRequest(**body)


def _snapshot(model):
    return {n: p.detach().clone() for root in (model.model.diffusion_model, model.cond_stage_model)
            for n, p in root.state_dict().items()}


def _unchanged(model, before, modules, words):
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    for root in (model.model.diffusion_model, model.cond_stage_model):
        assert all(p.grad is None for p in root.parameters())
        assert all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__ for m in root.modules())
    db = modules.sd_hijack.model_hijack.embedding_db
    assert sorted(db.word_embeddings) == words
    assert all(e.name in words for entries in db.ids_lookup.values() for _, e in entries)


@pytest.mark.parametrize("lora", [False, True])
def test_an_extraction_writes_files_the_host_loads_and_leaves_the_model_as_it_was(host, lora):
    model, modules, folder = host
    before = _snapshot(model)
    written, extraction = extract_ui.run_as_job(_request(settings=dict(rounds=1, steps=2, lora=lora)))
    _unchanged(model, before, modules, ["xquix", "xzorb"])  # the database reloaded from the folder, nothing lent left
    assert written["embeddings"] == ["xzorb", "xquix"] and written["concept_prompts"] == ["a xzorb man", "a xquix woman"]
    db = modules.sd_hijack.model_hijack.embedding_db
    assert db.loads == 1  # the host's list was read again
    for name in ("xzorb", "xquix"):
        loaded = db.word_embeddings[name]
        assert loaded.vectors == 2 and loaded.shape == CTX
        assert torch.equal(loaded.vec, extraction.vectors[name])
    assert [r["round"] for r in written["rounds"]] == [0, 1] and written["rounds"][1]["loss"] > 0
    assert modules.shared.state.job == ""
    if lora:
        assert sorted(written["loras"]) == ["xquix", "xzorb"]
        net = fake_networks.load_network("xzorb", fake_networks.available_networks["xzorb"])
        assert len(net.modules) == len(A1111Extract().concept_model(model).lora_layers)  # every layer found by the host
        with safe_open(str(folder / "Lora" / "xzorb.safetensors"), "pt") as f:
            metadata = f.metadata()
        assert metadata["ss_tag_frequency"] == '{"omg extract": {"xzorb": 1}}'
        assert json.loads(metadata["omg_extract"])["settings"]["lora"] is True
    else:
        assert written["loras"] == [] and not list((folder / "Lora").iterdir())


def test_a_prompt_naming_an_embedding_encodes_its_vectors_at_its_positions(host):
    model, modules, _ = host
    cm = A1111Extract().concept_model(model)
    vectors = {"xzorb": torch.randn(3, CTX)}
    prompt = "a xzorb man and a woman"
    assert cm.positions(prompt, "xzorb", vectors) == [2, 3, 4] and cm.positions(prompt, "man", vectors) == [5]
    context = cm.encode([prompt], vectors)
    assert torch.allclose(context[0, 2:5], model.cond_stage_model.proj(vectors["xzorb"]), atol=1e-6)
    assert modules.sd_hijack.model_hijack.embedding_db.word_embeddings == {}  # lent for the call only


def test_an_extraction_over_the_api_takes_base64_pictures(host):
    buffer = io.BytesIO()
    _picture().save(buffer, format="PNG")
    body = {"images": ["data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()],
            "concepts": [{"name": "xzorb", "class_word": "man", "boxes": [[0, 0, 48, 64]]}], "settings": {"rounds": 0}}
    request = ExtractRequest.from_json(body)
    assert request.pictures()[0].size == (96, 64)
    assert request.extract_concepts((96, 64))[0].masks[0][:, :48].all() and not request.extract_concepts((96, 64))[0].masks[0][:, 48:].any()
    with pytest.raises(OmgUserError, match="unknown extraction field 'rank'"):
        ExtractRequest.from_json({**body, "rank": 4})
    with pytest.raises(OmgUserError, match="picture 1 is not a base64 PNG or JPEG"):
        ExtractRequest.from_json({**body, "images": ["not a picture"]}).pictures()


def test_the_tab_reads_boxes_per_picture():
    assert extract_ui.parse_boxes("0 0 10 20; ; 1,2,3,4", 3, "c") == [[0, 0, 10, 20], None, [1, 2, 3, 4]]
    assert extract_ui.parse_boxes("  ", 2, "c") == []
    with pytest.raises(OmgUserError, match="c: a box is four numbers"):
        extract_ui.parse_boxes("0 0 10", 1, "c")


def test_a_box_drawn_on_the_first_picture_is_its_concepts_unless_boxes_are_typed(tmp_path, monkeypatch):
    path = tmp_path / "picture.png"
    _picture().save(path)  # 96x64
    requests = []

    def run_as_job(request, progress):
        requests.append(request)
        raise OmgUserError("stopped by the test")

    monkeypatch.setattr(extract_ui, "run_as_job", run_as_job)
    drawn = json.dumps({"width": 192, "height": 128, "boxes": {"1": [0, 0, 96, 128], "2": [96, 0, 192, 128]}})  # a canvas twice as large
    rows = ["xzorb", "man", "0 0 16 16", "xquix", "woman", "", "", "", "", "", "", ""]
    out = list(extract_ui.extract_from_tab([str(path)], drawn, 0, 2, 2, 0.01, False, "first", *rows))
    assert "stopped by the test" in out[-1][0]
    first, second = requests[0].extract_concepts((96, 64))
    assert first.masks[0][:16, :16].all() and first.masks[0].sum() == 16 * 16  # typed: the typed box
    assert second.masks[0][:, 48:].all() and not second.masks[0][:, :48].any()  # drawn: in the picture's pixels
    out = list(extract_ui.extract_from_tab([str(path)], "{not json", 0, 2, 2, 0.01, False, "first", *rows))
    assert "the boxes drawn on the first picture: OMG regions: not valid JSON" in out[-1][0] and len(requests) == 1
    html, cleared = extract_ui.canvas_for([str(path)])
    assert 'data-width="96" data-height="64"' in html and "data:image/png;base64," in html and cleared == ""


@pytest.mark.parametrize("change, message", [
    (dict(images=[]), "give 1 to 4 pictures of the concepts, got 0"),
    (dict(images=[_picture(), _picture(size=(64, 64))]), "the pictures must all have one size; got 96x64, 64x64"),
    (dict(images=[_picture(mode="CMYK")]), "picture 1 has mode CMYK"),
    (dict(images=[_picture(size=(100, 64))]), "each side must be a multiple of 8"),
    (dict(concepts=[{"name": "xzorb", "class_word": ""}]), "concept 'xzorb' has no class word"),
    (dict(concepts=[{"name": "taken", "class_word": "man"}]), "an embedding named 'taken' already exists"),
    (dict(concepts=[{"name": "xzorb", "class_word": "man", "boxes": [[0, 0, 200, 10]]}]), "must lie inside the 96x64 picture"),
    (dict(settings=dict(steps=0)), "steps must be a whole number of at least 1, got 0"),
    (dict(settings=dict(speed=2)), "unknown extraction setting 'speed'"),
])
def test_bad_input_is_named_and_changes_nothing(host, change, message):
    model, modules, folder = host
    (folder / "embeddings" / "taken.pt").write_bytes(b"a user's embedding")
    before, files = _snapshot(model), sorted(p.name for p in (folder / "embeddings").iterdir())
    with pytest.raises(OmgUserError, match=message):
        extract_ui.run_as_job(_request(**change))
    _unchanged(model, before, modules, [])
    assert sorted(p.name for p in (folder / "embeddings").iterdir()) == files
    assert (folder / "embeddings" / "taken.pt").read_bytes() == b"a user's embedding"


def test_a_lora_name_in_use_is_refused_before_any_step(host):
    _, _, folder = host
    (folder / "Lora" / "xzorb.safetensors").write_bytes(b"a user's LoRA")
    with pytest.raises(OmgUserError, match="a LoRA named 'xzorb' already exists"):
        extract_ui.run_as_job(_request(settings=dict(rounds=1, steps=2, lora=True)))
    assert (folder / "Lora" / "xzorb.safetensors").read_bytes() == b"a user's LoRA"
    assert not list((folder / "embeddings").iterdir())


@pytest.mark.parametrize("phase", ["round 0", "step 1", "step 2", "round 1: masks"])
def test_an_interrupt_in_any_phase_writes_nothing_and_leaves_the_model_as_it_was(host, phase):
    model, modules, folder = host
    before = _snapshot(model)

    def progress(text, done):
        if phase in text:
            modules.shared.state.interrupt()

    with pytest.raises(OmgUserError, match="the extraction was interrupted; nothing was written"):
        extract_ui.run_as_job(_request(settings=dict(rounds=1, steps=2, lora=True)), progress)
    _unchanged(model, before, modules, [])
    assert not list((folder / "embeddings").iterdir()) and not list((folder / "Lora").iterdir())


def test_the_new_concepts_paste_into_the_omg_accordion_rows():
    from omg_ext.config import from_infotext

    text = extract_ui.paste_text({"embeddings": ["xzorb", "xquix"], "loras": ["xzorb", "xquix"],
                                  "class_words": ["man", "woman"], "concept_prompts": ["a xzorb man", "a xquix woman"]})
    prompt, params = text.split("\n")
    assert prompt == "a xzorb man and a xquix woman"
    cfg = from_infotext(dict(part.split(": ", 1) for part in params.split(", ")))
    assert cfg.enabled and [(c.class_word, c.prompt, c.lora) for c in cfg.concepts] == [
        ("man", "a xzorb man", "xzorb"), ("woman", "a xquix woman", "xquix")]
