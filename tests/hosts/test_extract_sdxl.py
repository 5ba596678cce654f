"""Extracting concepts with an SDXL checkpoint, on the A1111 and Forge stand-ins: an embedding's vectors split
between CLIP-L and CLIP-G (``clip_l``/``clip_g`` files, as both hosts load them), learnt through both encoders'
tokens and CLIP-G's pooled output; the size conditioning the pictures' size; the model and the databases as
they were afterwards."""
import types

import pytest
import torch
from torch import nn

from minisd.sampling import DiscreteSchedule
from minisd.unet import TinyUNet
from omg_ext.concepts.files import embedding_vectors
from omg_ext.hosts import extract_ui
from omg_ext.hosts.errors import OmgUserError
from omg_ext.hosts.extract_a1111 import A1111Extract
from omg_ext.hosts.extract_forge import ForgeExtract
from tests.hosts.test_extract_forge import _ForgeEngine, _Objects, _request
from tests.hosts.test_extract_host import a1111_with
from tests.hosts.test_extract_forge import host as forge_host  # noqa: F401  (the Forge fixture, for a Forge SDXL model)
from tests.support.fake_a1111.embedding_clip import SIZE_FEATURES, SdxlConditioner, size_features
from tests.support.fake_forge.forge_unet import KModel, forge_unet
from tests.support.fake_forge.patchers import CLIP, UnetPatcher

DIM_L, DIM_G = 32, 48
PARTS = {"clip_l": DIM_L, "clip_g": DIM_G}


def _pool_vae(x):
    x = nn.functional.avg_pool2d(x, 8)
    return torch.cat([x, x.mean(1, keepdim=True)], 1)


class _A1111Sdxl:
    """A1111's SDXL ``DiffusionEngine`` after the hijack: the conditioner as ``cond_stage_model``, an sgm-style
    UNet taking ``y``."""

    is_sdxl = True

    def __init__(self):
        self.conditioner = self.cond_stage_model = SdxlConditioner(DIM_L, DIM_G)
        self.model = types.SimpleNamespace(diffusion_model=TinyUNet(
            context_dim=DIM_L + DIM_G, adm_in_channels=DIM_G + SIZE_FEATURES, channel_mult=(1, 2), seed=0).eval())
        self.alphas_cumprod = DiscreteSchedule().alphas_cumprod

    def get_learned_conditioning(self, batch):
        return self.conditioner.conditioning(batch)

    def encode_first_stage(self, x):
        return _pool_vae(x)

    def get_first_stage_encoding(self, z):
        return z * 0.5


@pytest.fixture
def a1111(tmp_path, monkeypatch):
    model = _A1111Sdxl()
    with a1111_with(model, tmp_path, monkeypatch) as modules:
        yield model, modules, tmp_path


def _weights(*roots):
    return {f"{i}.{n}": p.detach().clone() for i, root in enumerate(roots) for n, p in root.state_dict().items()}


def _moved(extraction, start):
    """Whether both encoders' parts of every concept's vectors left their start."""
    return all(not torch.allclose(embedding_vectors(v, PARTS)[k], embedding_vectors(start[name], PARTS)[k])
               for name, v in extraction.vectors.items() for k in PARTS)


def test_an_sdxl_extraction_on_a1111_writes_clip_l_and_clip_g_files_the_host_loads(a1111):
    model, modules, folder = a1111
    roots = (model.model.diffusion_model, model.conditioner)
    before = _weights(*roots)
    cm = A1111Extract().concept_model(model, (96, 64))
    start = {"xzorb": cm.init_vectors("man", 2), "xquix": cm.init_vectors("woman", 2)}
    written, extraction = extract_ui.run_as_job(_request(lora=True, learning_rate=0.05))
    after = _weights(*roots)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for root in roots for p in root.parameters())
    db = modules.sd_hijack.model_hijack.embedding_db
    assert db.loads == 1 and sorted(db.word_embeddings) == ["xquix", "xzorb"]
    for name in ("xzorb", "xquix"):
        loaded = db.word_embeddings[name]
        assert loaded.vectors == 2 and loaded.shape == DIM_L + DIM_G
        assert {k: v.shape for k, v in loaded.vec.items()} == {"clip_l": (2, DIM_L), "clip_g": (2, DIM_G)}
        assert torch.equal(torch.cat([loaded.vec["clip_l"], loaded.vec["clip_g"]], 1), extraction.vectors[name])
    assert _moved(extraction, start)  # CLIP-G's part learnt too
    assert written["loras"] == ["xzorb", "xquix"] and (folder / "Lora" / "xzorb.safetensors").exists()


def test_the_sdxl_conditioning_is_the_hosts_with_the_vectors_in_both_encoders_and_the_pictures_size(a1111):
    model, modules, _ = a1111
    cm = A1111Extract().concept_model(model, (96, 64))
    plain = cm.encode(["a man and a woman"], {})
    host = model.get_learned_conditioning(modules.prompt_parser.SdConditioning(["a man and a woman"], width=96, height=64))
    assert all(torch.allclose(plain[k], host[k], atol=1e-6) for k in ("crossattn", "vector"))
    vectors = {"xzorb": torch.randn(2, DIM_L + DIM_G, requires_grad=True)}
    cond = cm.encode(["a xzorb man"], vectors)
    clip_l, clip_g = model.conditioner.embedders
    assert torch.allclose(cond["crossattn"][0, 2:4, :DIM_L], clip_l.proj(vectors["xzorb"][:, :DIM_L]), atol=1e-5)
    assert torch.allclose(cond["crossattn"][0, 2:4, DIM_L:], clip_g.proj(vectors["xzorb"][:, DIM_L:]), atol=1e-5)
    assert torch.equal(cond["vector"][:, DIM_G:], size_features(96, 64, 1))
    pooled_grad = torch.autograd.grad(cond["vector"][:, :DIM_G].sum(), vectors["xzorb"])[0]
    assert pooled_grad[:, DIM_L:].abs().sum() > 0 and pooled_grad[:, :DIM_L].abs().sum() == 0
    assert modules.sd_hijack.model_hijack.embedding_db.word_embeddings == {}


def test_an_init_text_of_several_tokens_starts_both_parts_and_the_refiner_is_refused(a1111):
    model, *_ = a1111
    cm = A1111Extract().concept_model(model)
    assert cm.init_vectors("young woman", 1).shape == (1, DIM_L + DIM_G)  # CLIP-G's lookup gives both tokens, CLIP-L's one
    model.conditioner.embedders = nn.ModuleList([model.conditioner.embedders[1]])
    with pytest.raises(OmgUserError, match="SDXL refiner has one; load a base SDXL checkpoint"):
        A1111Extract().concept_model(model)


class _ForgeSdxl:
    """Forge's SDXL engine: ``text_processing_engine_l`` and ``_g`` with a database each, its conditioning in
    inference mode; models built in inference mode."""

    is_sdxl = True

    def __init__(self, folder):
        with torch.inference_mode():
            unet = forge_unet(DIM_L + DIM_G, seed=0, channel_mult=(1, 2), adm_in_channels=DIM_G + SIZE_FEATURES)
            self.text_processing_engine_l = _ForgeEngine(folder, dim=DIM_L, key="clip_l", seed=0)
            self.text_processing_engine_g = _ForgeEngine(folder, dim=DIM_G, key="clip_g", pooled=True, seed=1)
        encoders = nn.ModuleDict({"clip_l": self.text_processing_engine_l, "clip_g": self.text_processing_engine_g})
        self.forge_objects = _Objects(UnetPatcher(KModel(unet)), CLIP(encoders))
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.alphas_cumprod = DiscreteSchedule().alphas_cumprod

    @torch.inference_mode()
    def get_learned_conditioning(self, prompts):
        cond_l, (cond_g, pooled) = self.text_processing_engine_l(prompts), self.text_processing_engine_g(prompts)
        size = size_features(getattr(prompts, "width", 1024) or 1024, getattr(prompts, "height", 1024) or 1024, len(prompts))
        return {"crossattn": torch.cat([cond_l, cond_g], 2), "vector": torch.cat([pooled, size], 1)}

    def encode_first_stage(self, x):
        with torch.inference_mode():
            return _pool_vae(x)

    def get_first_stage_encoding(self, z):
        return z


def test_an_sdxl_extraction_on_forge_writes_files_both_engines_load(forge_host):
    _, modules, folder, engine_module = forge_host
    model = modules.shared.sd_model = _ForgeSdxl(str(folder / "embeddings"))
    engines = (model.text_processing_engine_l, model.text_processing_engine_g)
    before = _weights(model.forge_objects.unet.model, *engines)
    cm = ForgeExtract().concept_model(model, (96, 64))
    start = {"xzorb": cm.init_vectors("man", 2), "xquix": cm.init_vectors("woman", 2)}
    plain = cm.encode(["a man"], {})
    host = model.get_learned_conditioning(modules.prompt_parser.SdConditioning(["a man"], width=96, height=64))
    assert all(torch.allclose(plain[k], host[k], atol=1e-6) for k in ("crossattn", "vector"))
    written, extraction = extract_ui.run_as_job(_request(learning_rate=0.05))
    after = _weights(model.forge_objects.unet.model, *engines)
    assert all(torch.equal(before[k], after[k]) for k in before)
    for engine in engines:
        db = engine.embeddings
        assert db.loads == 1 and sorted(db.word_embeddings) == ["xquix", "xzorb"]
        vec = db.word_embeddings["xzorb"].vec
        assert torch.equal(torch.cat([vec["clip_l"], vec["clip_g"]], 1), extraction.vectors["xzorb"])
    assert _moved(extraction, start)
    assert engine_module.last_extra_generation_params == {"Emphasis": "Original"}
    assert written["embeddings"] == ["xzorb", "xquix"]
