"""Extracting concepts on the Forge stand-in: the checkpoint's own UNet patcher and Forge's text engine, weights
built in inference mode as Forge's loader builds them (autograd cannot keep those: the M-step computes with
plain copies), OMG's attention patch reaching the UNet through the transformer options, the engine's embedding
database and its "TI" infotext note restored, the files read back by the engine's database."""
import os
import sys
import types

import pytest
import safetensors.torch
import torch
from PIL import Image
from torch import nn

from minisd.sampling import DiscreteSchedule
from omg_ext.hosts import extract_ui
from omg_ext.hosts.errors import OmgUserError
from omg_ext.hosts.extract_forge import ForgeExtract
from omg_ext.hosts.extract_request import ExtractRequest
from tests.support import fake_forge
from tests.support.fake_a1111.embedding_clip import CTX, EmbeddingClip
from tests.support.fake_a1111.modules.textual_inversion.textual_inversion import EmbeddingDatabase, create_embedding_from_data
from tests.support.fake_forge.forge_unet import KModel, forge_unet
from tests.support.fake_forge.patchers import CLIP, UnetPatcher
from tests.hosts.test_forge_adapter import _Objects


class _ForgeDatabase(EmbeddingDatabase):
    """Forge's ``backend.text_processing.textual_inversion.EmbeddingDatabase``: registration without the model,
    a reload without arguments, from its own folder."""

    def __init__(self, folder, engine):
        super().__init__()
        self.folder, self.engine = folder, engine

    def register_embedding(self, embedding):
        return self.register_embedding_by_name(embedding, types.SimpleNamespace(cond_stage_model=self.engine()), embedding.name)

    def load_textual_inversion_embeddings(self):
        self.ids_lookup.clear()
        self.word_embeddings.clear()
        self.loads += 1
        for filename in sorted(os.listdir(self.folder)):
            name, ext = os.path.splitext(filename)
            if ext == ".safetensors":
                path = os.path.join(self.folder, filename)
                self.register_embedding(create_embedding_from_data(safetensors.torch.load_file(path), name, filename, path))


class _Positions(nn.Module):
    """CLIP's position embedding: its ids a buffer (made in inference mode by Forge's loader, like the weights)."""

    def __init__(self, dim=CTX):
        super().__init__()
        self.position_embedding = nn.Embedding(77, dim)
        self.register_buffer("position_ids", torch.arange(77))

    def forward(self):
        return self.position_embedding(self.position_ids)


class _ForgeEngine(EmbeddingClip):
    """Forge's ``ClassicTextProcessingEngine``: its text encoder under ``text_encoder.transformer.text_model``, its
    database as ``embeddings``, and the "TI" note it leaves for the next picture's infotext."""

    def __init__(self, folder, **encoder):
        """``encoder``: ``EmbeddingClip``'s width, SDXL key and pooled output (SDXL's CLIP-L and CLIP-G engines)."""
        super().__init__(database=lambda: self.embeddings, **encoder)
        self.embeddings = _ForgeDatabase(folder, lambda: self)
        te = nn.Module()
        te.transformer = nn.Module()
        te.transformer.text_model = nn.Module()
        te.transformer.text_model.embeddings = nn.Module()
        te.transformer.text_model.embeddings.token_embedding = self.embed
        te.proj = self.proj
        self.positions = te.transformer.text_model.embeddings.positions = _Positions(self.embed.weight.shape[1])
        self.__dict__["text_encoder"] = te

    def __call__(self, texts):
        from backend.text_processing import classic_engine

        names = [f.embedding.name for t in texts for f in self.tokenize_line(t)[0][0].fixes]
        if names:
            classic_engine.last_extra_generation_params["TI"] = ", ".join(names)
        out = super().__call__(texts)
        if self.return_pooled:
            return out[0] + self.positions()[None], out[1]
        return out + self.positions()[None]


class _ForgeModel:
    is_sdxl = False

    def __init__(self, folder):
        with torch.inference_mode():  # as Forge's loader builds its models
            unet = forge_unet(CTX, seed=0, channel_mult=(1, 2))
            self.text_processing_engine = _ForgeEngine(folder)
        self.forge_objects = _Objects(UnetPatcher(KModel(unet)), CLIP(self.text_processing_engine))
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.alphas_cumprod = DiscreteSchedule().alphas_cumprod

    def encode_first_stage(self, x):
        with torch.inference_mode():
            x = nn.functional.avg_pool2d(x, 8)
            return torch.cat([x, x.mean(1, keepdim=True)], 1)

    def get_first_stage_encoding(self, z):
        return z


class _ClassicModel(_ForgeModel):
    """Forge Classic's and reForge's SD1.5: Forge's patchers around A1111's hijacked ``cond_stage_model`` (with the
    hijack's embedding database); weights built in inference mode."""

    def __init__(self):
        with torch.inference_mode():
            unet = forge_unet(CTX, seed=0, channel_mult=(1, 2))
            self.cond_stage_model = EmbeddingClip()
        self.forge_objects = _Objects(UnetPatcher(KModel(unet)), CLIP(self.cond_stage_model))
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.alphas_cumprod = DiscreteSchedule().alphas_cumprod


@pytest.fixture
def host(tmp_path, monkeypatch):
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "Lora").mkdir()
    engine_module = types.ModuleType("backend.text_processing.classic_engine")
    engine_module.last_extra_generation_params = {"Emphasis": "Original"}
    with fake_forge.installed() as modules:
        text_processing = types.ModuleType("backend.text_processing")
        text_processing.classic_engine = engine_module
        monkeypatch.setitem(sys.modules, "backend.text_processing", text_processing)
        monkeypatch.setitem(sys.modules, "backend.text_processing.classic_engine", engine_module)
        model = _ForgeModel(str(tmp_path / "embeddings"))
        modules.shared.sd_model = model
        modules.shared.cmd_opts.embeddings_dir = str(tmp_path / "embeddings")
        modules.shared.cmd_opts.lora_dir = str(tmp_path / "Lora")
        monkeypatch.setattr("omg_ext.hosts.running_forge", lambda: True)
        from tests.support.fake_a1111 import networks as fake_networks

        monkeypatch.setitem(sys.modules, "networks", fake_networks)
        fake_networks.list_available_networks()
        yield model, modules, tmp_path, engine_module
        modules.shared.state.interrupted = False  # the stand-in's state outlives the test


def _weights(model):
    return {n: p.clone() for root in (model.forge_objects.unet.model, model.text_processing_engine)
            for n, p in root.state_dict().items()}


def _request(**settings):
    pixels = (torch.rand(64, 96, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()
    return ExtractRequest([Image.fromarray(pixels)], [{"name": "xzorb", "class_word": "man"}, {"name": "xquix", "class_word": "woman"}],
                          {"rounds": 1, "steps": 2, **settings})


@pytest.mark.parametrize("lora", [False, True])
def test_an_extraction_on_forge_writes_files_its_engine_loads_and_leaves_the_model_as_it_was(host, lora):
    model, modules, folder, engine_module = host
    before = _weights(model)
    assert all(p.is_inference() for p in model.forge_objects.unet.model.parameters())
    written, extraction = extract_ui.run_as_job(_request(lora=lora))
    after = _weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.is_inference() for p in model.forge_objects.unet.model.parameters())  # the very tensors, not copies
    for root in (model.forge_objects.unet.model, model.text_processing_engine):
        assert all(not m._forward_hooks and not m._forward_pre_hooks and "_omg_saved" not in m.__dict__ for m in root.modules())
    db = model.text_processing_engine.embeddings
    assert db.loads == 1 and sorted(db.word_embeddings) == ["xquix", "xzorb"]
    assert torch.equal(db.word_embeddings["xzorb"].vec, extraction.vectors["xzorb"])
    assert engine_module.last_extra_generation_params == {"Emphasis": "Original"}  # no "TI" note of the lent vectors
    assert written["rounds"][1]["loss"] > 0
    assert written["loras"] == (["xzorb", "xquix"] if lora else [])


def test_an_extraction_on_forge_classic_goes_through_a1111s_text_encoder_and_database(tmp_path, monkeypatch):
    for folder in ("embeddings", "Lora"):
        (tmp_path / folder).mkdir()
    with fake_forge.installed("ldm_patched") as modules:
        model = modules.shared.sd_model = _ClassicModel()
        modules.shared.cmd_opts.embeddings_dir = str(tmp_path / "embeddings")
        modules.shared.cmd_opts.lora_dir = str(tmp_path / "Lora")
        db = modules.sd_hijack.model_hijack.embedding_db = modules.textual_inversion.textual_inversion.EmbeddingDatabase()
        monkeypatch.setattr("omg_ext.hosts.running_forge", lambda: True)
        from tests.support.fake_a1111 import networks as fake_networks

        monkeypatch.setitem(sys.modules, "networks", fake_networks)
        fake_networks.list_available_networks()
        roots = (model.forge_objects.unet.model, model.cond_stage_model)
        before = {f"{i}.{n}": p.clone() for i, root in enumerate(roots) for n, p in root.state_dict().items()}
        try:
            written, extraction = extract_ui.run_as_job(_request(lora=True))
        finally:
            modules.shared.state.interrupted = False
        after = {f"{i}.{n}": p.clone() for i, root in enumerate(roots) for n, p in root.state_dict().items()}
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert all(p.is_inference() for root in roots for p in root.parameters())
        assert db.loads == 1 and sorted(db.word_embeddings) == ["xquix", "xzorb"]
        assert torch.equal(db.word_embeddings["xzorb"].vec, extraction.vectors["xzorb"])
        assert written["loras"] == ["xzorb", "xquix"] and written["rounds"][1]["loss"] > 0


def test_an_extraction_as_forges_first_job_loads_the_checkpoint_first(host, monkeypatch):
    """Forge loads the selected checkpoint at the first job: before it, ``shared.sd_model`` is no engine yet."""
    model, modules, folder, _ = host
    modules.shared.sd_model = types.SimpleNamespace()  # what Forge holds before its first job
    loads = []

    def forge_model_reload():
        loads.append(1)
        modules.shared.sd_model = model
        return model, True

    monkeypatch.setattr(modules.sd_models, "forge_model_reload", forge_model_reload, raising=False)
    written, _ = extract_ui.run_as_job(_request())
    assert loads == [1] and written["embeddings"] == ["xzorb", "xquix"]


def test_the_e_step_captures_through_forges_transformer_options(host):
    model, *_ = host
    cm = ForgeExtract().concept_model(model)
    vectors = {"xzorb": torch.randn(2, CTX)}
    context = cm.encode(["a xzorb man"], vectors)
    from omg_ext.concepts.estep import token_maps

    latents = torch.randn(1, 4, 16, 16)
    maps = token_maps(cm, latents, context, [[cm.positions("a xzorb man", "xzorb", vectors)]], (500,), 1, torch.Generator().manual_seed(0))
    assert maps.shape == (1, 1, 8, 8) and float(maps.sum()) > 0  # the patch saw the q and k of every capture layer
    assert cm.unet.forge_options == {}  # the patch table left with the capture


def test_an_interrupt_on_forge_writes_nothing_and_restores_the_database(host):
    model, modules, folder, engine_module = host
    before = _weights(model)

    def progress(text, done):
        if "step 2" in text:
            modules.shared.state.interrupt()

    with pytest.raises(OmgUserError, match="interrupted; nothing was written"):
        extract_ui.run_as_job(_request(lora=True), progress)
    after = _weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.text_processing_engine.embeddings.word_embeddings == {}
    assert not list((folder / "embeddings").iterdir()) and not list((folder / "Lora").iterdir())
    assert engine_module.last_extra_generation_params == {"Emphasis": "Original"}


def test_a_layers_weight_copy_lives_only_while_the_layer_runs():
    """Autograd keeps the inference weights themselves and copies them again in the backward pass: the model's
    copies do not pile up over a forward pass (SDXL's would double Forge's 5 GB UNet and fill the memory)."""
    import gc
    import weakref

    from omg_ext.hosts.extract_forge import trainable
    from tests.support.fake_forge import forge_unet as fake

    with torch.inference_mode():
        unet = fake.forge_unet(CTX, seed=3, channel_mult=(1, 2))
    copies = []

    class Copies(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.Tensor.clone and args[0].is_inference():
                copies.append(weakref.ref(out))
            return out

    context = torch.randn(2, 77, CTX, requires_grad=True)
    with trainable(unet):
        with Copies():
            out = unet(torch.randn(2, 4, 16, 16), torch.full((2,), 400.0), context=context, transformer_options={})
        gc.collect()
        assert len(copies) == len(list(unet.parameters())) and not [c for c in copies if c() is not None]
        assert torch.autograd.grad(out.pow(2).mean(), context)[0].abs().sum() > 0


def test_the_m_step_trains_through_an_attention_autograd_cannot_go_through(host, monkeypatch):
    """Forge's sub-quadratic attention (its choice on CPUs and cards without PyTorch attention) exponentiates in
    place once little free memory makes it chunk, which autograd refuses: the M-step's blocks attend through
    differentiable replace patches instead (this failed in a real Forge with SDXL on this CPU)."""
    from tests.support.fake_forge import forge_unet as fake

    def sub_quadratic(q, k, v, heads, mask=None):
        b, n, c = q.shape
        q, k, v = (t.view(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
        weights = q @ k.transpose(-1, -2) * (c // heads) ** -0.5
        weights -= weights.amax(-1, keepdim=True).detach()
        torch.exp(weights, out=weights)
        out = (weights / weights.sum(-1, keepdim=True)) @ v
        return out.transpose(1, 2).reshape(b, n, c)

    monkeypatch.setattr(fake, "attention_function", sub_quadratic)
    written, extraction = extract_ui.run_as_job(_request())
    assert written["rounds"][1]["loss"] > 0 and torch.isfinite(extraction.vectors["xzorb"]).all()


def test_gradients_through_forges_in_place_unet_are_those_of_the_same_unet_out_of_place(monkeypatch):
    from omg_ext.hosts.extract_forge import trainable
    from tests.support.fake_forge import forge_unet as fake

    with torch.inference_mode():
        unet = fake.forge_unet(CTX, seed=3, channel_mult=(1, 2))
    x, t = torch.randn(2, 4, 16, 16), torch.full((2,), 400.0)

    def grad():
        context = torch.randn(2, 77, CTX, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with trainable(unet):
            return torch.autograd.grad(unet(x, t, context=context, transformer_options={}).pow(2).mean(), context)[0]

    in_place = grad()

    def out_of_place(self, x, context=None):
        n = self.norm1(x)
        x = x + self._attend(self.attn1, {}, n, n, {})
        x = x + self._attend(self.attn2, {}, self.norm2(x), context, {})
        return x + self.ff(self.norm3(x))

    monkeypatch.setattr(fake.ForgeTransformerBlock, "forward", out_of_place)
    assert torch.allclose(in_place, grad(), atol=1e-6)
