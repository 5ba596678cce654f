"""The Forge adapter against a stand-in of the Forge surface it touches (tests/support/fake_forge)."""
import contextlib
import copy
import functools
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from omg_ext.config import ConceptSpec, OmgConfig
from omg_ext.hosts import a1111, forge, forge_attention, forge_backend, forge_controlnet, forge_lora
from omg_ext.engine.lora import DenseDelta, LowRankDelta, RowRoutedLoRA
from omg_ext.engine.rows import RowRole
from tests.support import fake_forge
from tests.support.fake_forge.cfg_batches import sampling_function
from tests.support.fake_forge.controlnet import RowResidualControl
from tests.support.fake_forge.ldm_patched import LoRAAdapter
from tests.support.fake_forge.lora_files import merge_lora_to_weight
from tests.support.fake_forge.patchers import CLIP, LdmCLIP, UnetPatcher
from tests.support.fake_forge.forge_unet import ForgeLinear, KModel, forge_unet, with_forge_linears
from minisd.sampling import SAMPLERS, DiscreteSchedule
from tests.hosts.test_a1111_adapter import CTX, _Clip

TO_K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
PROJ_IN = "input_blocks.3.1.proj_in"


def test_row_roles_follow_cond_or_uncond():
    assert forge.row_roles([1, 0], 4) == [RowRole(False, 0), RowRole(False, 1), RowRole(True, 0), RowRole(True, 1)]
    assert forge.row_roles([0, 1], 2) == [RowRole(True, 0), RowRole(False, 0)]
    assert forge.row_roles([1], 3) == [RowRole(False, 0), RowRole(False, 1), RowRole(False, 2)]
    assert forge.row_roles([0], 1) == [RowRole(True, 0)]
    with pytest.raises(RuntimeError, match=r"3 rows do not split into chunks \[1, 0\]"):
        forge.row_roles([1, 0], 3)


class _Objects:
    def __init__(self, unet, clip):
        self.unet, self.clip = unet, clip

    def shallow_copy(self):
        return _Objects(self.unet, self.clip)


class _ForgeModel:
    """A Forge SD1.5 engine: ``forge_objects`` and ``get_learned_conditioning``; the prompt tokenizer is
    Forge's ``text_processing_engine`` or, in Forge Classic and reForge (``backend="ldm_patched"``),
    A1111's ``cond_stage_model``."""

    is_sd1 = True

    def __init__(self, fp8: bool = False, backend: str = "backend"):
        backend = "backend" if backend == "neo" else backend  # Neo keeps Forge's names
        self.encoder, self.backend = _Clip(), backend
        torch.manual_seed(0)
        for p in self.encoder.parameters():
            nn.init.normal_(p, std=0.2)
        if backend == "backend":
            self.text_processing_engine = self.encoder
        else:
            self.cond_stage_model = self.encoder
        diffusion_model = forge_unet(CTX, seed=0)
        unet = UnetPatcher(KModel(with_forge_linears(diffusion_model) if fp8 else diffusion_model))
        self.forge_objects = _Objects(unet, (CLIP if backend == "backend" else LdmCLIP)(self.encoder))
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()

    def get_learned_conditioning(self, prompts):
        memory = sys.modules["backend.memory_management" if self.backend == "backend" else "ldm_patched.modules.model_management"]
        memory.load_model_gpu(self.forge_objects.clip.patcher)
        return torch.cat([self.encoder.encode(p) for p in prompts])


class _Job:
    """Forge's ``StableDiffusionProcessingTxt2Img.sample``: reset forge_objects, the scripts' hook, sample."""

    def __init__(self, modules, model, steps=6, split=False, prompts=("a man and a woman",), seeds=(7,), latent=(16, 16)):
        self.modules, self.sd_model = modules, model
        self.prompts, self.negative_prompts = list(prompts), ["blurry"] * len(prompts)
        self.height, self.width = latent[0] * 8, latent[1] * 8
        self.seeds, self.subseeds, self.subseed_strength = list(seeds), list(seeds), 0.0
        self.seed_resize_from_h = self.seed_resize_from_w = 0
        self.rng_shape = (4, *latent)
        self.rng = modules.rng.ImageRNG(self.rng_shape, self.seeds)
        self.enable_hr, self.extra_generation_params = False, {}
        self.steps, self.split, self.fail_at_call, self.calls = steps, split, None, 0
        self.hooks, self.control = [], None
        self.extra_network_data = {}

    def cached_params(self, required_prompts, steps, extra_network_data, hires_steps=None, use_old_scheduling=False):
        """The host's key of a prompt's conditioning, with what of it this stand-in has."""
        return (required_prompts, steps, hires_steps, use_old_scheduling, extra_network_data, self.width, self.height)

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        x = self.rng.next()
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        for hook in self.hooks:
            hook(self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning)
        patcher = self.sd_model.forge_objects.unet
        cond, uncond = {"crossattn": conditioning}, {"crossattn": unconditional_conditioning}
        step, state = iter(range(self.steps)), self.modules.shared.state

        def denoiser(x, sigma):
            # Euler: a denoiser call per step; the host's per-step callback sets the counter after the step's
            # UNet call, so during step i it still says i - 1
            state.sampling_step, state.sampling_steps = max(next(step) - 1, 0), self.steps
            self.calls += 1
            if self.calls == self.fail_at_call:
                raise RuntimeError("sampler failed")
            denoised = sampling_function(patcher, x, sigma.reshape(1).expand(x.shape[0]), cond, uncond, 7.0, split=self.split,
                                         control=self.control)
            callbacks = self.modules.script_callbacks  # Forge keeps A1111's after-CFG callback
            callbacks.cfg_after_cfg_callback(callbacks.AfterCFGCallbackParams(denoised, state.sampling_step, self.steps))
            return denoised

        sigmas = DiscreteSchedule().get_sigmas(self.steps)
        return SAMPLERS["euler"](denoiser, x * sigmas[0], sigmas)

    def sample_hr_pass(self, *args, **kwargs):
        raise AssertionError("no hires in this job")


def _write_lora(path, model, scale=0.5):
    """A kohya file: plain LoRA on a UNet attn2.to_k, a diff on a UNet conv, plain LoRA on the text encoder's proj."""
    g = torch.Generator().manual_seed(3)
    unet = model.forge_objects.unet.model.diffusion_model
    to_k, proj_in, proj = unet.get_submodule(TO_K), unet.get_submodule(PROJ_IN), model.encoder.proj
    tensors = {
        "lora_unet_" + TO_K.replace(".", "_") + ".lora_up.weight": torch.randn(to_k.out_features, 2, generator=g) * scale,
        "lora_unet_" + TO_K.replace(".", "_") + ".lora_down.weight": torch.randn(2, to_k.in_features, generator=g) * scale,
        "lora_unet_" + TO_K.replace(".", "_") + ".alpha": torch.tensor(1.0),
        "lora_unet_" + PROJ_IN.replace(".", "_") + ".diff": torch.randn(proj_in.weight.shape, generator=g) * 0.05,
        "lora_te_proj.lora_up.weight": torch.randn(proj.out_features, 2, generator=g) * scale,
        "lora_te_proj.lora_down.weight": torch.randn(2, proj.in_features, generator=g) * scale,
    }
    save_file(tensors, str(path))


def _networks(path):
    mod = types.ModuleType("networks")
    mod.available_networks = {"hero": types.SimpleNamespace(filename=str(path), shorthash="0123456789ab", read_hash=lambda: None)}
    mod.list_available_networks = lambda: None
    mod.load_lora_state_dict = lambda filename: __import__("safetensors.torch").torch.load_file(filename)
    return mod


CFG = dict(enabled=True, mask_dilation=0, mask_feather=0, background="redrawn", concepts=[  # host rows in pass 2, as counted here
    ConceptSpec(lora="hero", class_word="man", prompt="a man, red cape", te_weight=0.7),
    ConceptSpec(class_word="woman", prompt="a woman, blue dress"),
])


BACKENDS = pytest.mark.parametrize("backend", ["backend", "ldm_patched"])
"""Forge, and Forge Classic / reForge."""


def _merge(backend, strength):
    return lambda patch, base, key: backend.merge(None, patch, base, strength, key)


def _run(tmp_path, monkeypatch, cfg, fail_at_call=None, fp8=False, control=None, backend="backend", before_omg=None, **job_args):
    """A plain Forge job and an OMG job on one model: (plain, final, job, model, generation, weights before).

    ``control(model, latent)``: a ControlNet for both jobs; ``backend``: "ldm_patched" for Forge Classic and reForge,
    "neo" for Forge Neo;
    ``before_omg(job)``: called before OMG is attached (other scripts' state)."""
    model = _ForgeModel(fp8, backend)
    _write_lora(tmp_path / "hero.safetensors", model)
    monkeypatch.setitem(sys.modules, "networks", _networks(tmp_path / "hero.safetensors"))
    weights = {k: v.clone() for k, v in model.forge_objects.unet.model.state_dict().items()}
    weights.update({"te." + k: v.clone() for k, v in model.encoder.state_dict().items()})
    with fake_forge.installed(backend) as modules:
        job = _Job(modules, model, **job_args)
        job.control = control and control(model, job.rng_shape[1:])
        c, uc = model.get_learned_conditioning(job.prompts), model.get_learned_conditioning(job.negative_prompts)
        plain = job.sample(c, uc, job.seeds, job.subseeds, 0, job.prompts)
        job.rng, job.calls, job.fail_at_call = modules.rng.ImageRNG(job.rng_shape, job.seeds), 0, fail_at_call
        if before_omg is not None:
            before_omg(job)
        generation = forge.ForgeGeneration(job, cfg)
        generation.attach()
        job.hooks.append(lambda p, **kwargs: generation.patch_unet())
        try:
            final = job.sample(c, uc, job.seeds, job.subseeds, 0, job.prompts)
        except RuntimeError as e:
            final = e
    return plain, final, job, model, generation, weights


@torch.no_grad()
@pytest.mark.parametrize("dense", [False, True])
def test_the_next_job_reuses_a_low_rank_concept_and_loads_a_dense_one_again(tmp_path, monkeypatch, dense):
    """A plain LoRA's concept is kept for the next job (``concept_cache``); a file with a ``diff`` layer
    (a dense delta, as large as its layers) is read again."""
    model, path = _ForgeModel(False, "backend"), tmp_path / "hero.safetensors"
    _write_lora(path, model)
    if not dense:
        save_file({k: v for k, v in load_file(str(path)).items() if not k.endswith(".diff")}, str(path))
    networks, reads = _networks(path), []
    read = networks.load_lora_state_dict
    networks.load_lora_state_dict = lambda filename: reads.append(filename) or read(filename)
    monkeypatch.setitem(sys.modules, "networks", networks)
    finals = []
    with fake_forge.installed("backend") as modules:
        for _ in range(2):
            job = _Job(modules, model)
            c, uc = model.get_learned_conditioning(job.prompts), model.get_learned_conditioning(job.negative_prompts)
            generation = forge.ForgeGeneration(job, OmgConfig(blend_start=0.5, **CFG))
            generation.attach()
            job.hooks.append(lambda p, generation=generation, **kwargs: generation.patch_unet())
            finals.append(job.sample(c, uc, job.seeds, job.subseeds, 0, job.prompts))
    assert len(reads) == (2 if dense else 1)
    assert torch.equal(finals[0], finals[1])


@torch.no_grad()
@pytest.mark.parametrize("latent", [(12, 16), (16, 10)])
def test_each_image_of_a_batch_is_made_from_its_own_prompt_and_orientation(tmp_path, monkeypatch, latent):
    """A batch whose prompts differ (wildcards): each image is the image it would be alone."""
    cfg = OmgConfig(blend_start=0.5, **CFG)
    prompts = ["a man and a woman", "on grass a woman hugs a tall man"]
    _, batch, job, _, generation, _ = _run(tmp_path, monkeypatch, cfg, prompts=prompts, seeds=[7, 8], latent=latent)
    generation.keep_pictures(torch.rand(2, 3, latent[0] * 8, latent[1] * 8))
    assert batch.shape == (2, 4, *latent) and len(generation.layout_images) == 2
    for i in range(2):
        _, alone, *_ = _run(tmp_path, monkeypatch, cfg, prompts=prompts[i:i + 1], seeds=[7 + i], latent=latent)
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-3, atol=1e-3)  # float noise of a batch ~1e-4


@torch.no_grad()
@pytest.mark.parametrize("latent", [(12, 16), (16, 10)])
def test_fast_mode_is_one_pass_through_forges_patches_each_image_its_own_and_everything_restored(tmp_path, monkeypatch, latent):
    cfg = OmgConfig(blend_start=0.5, mode="fast", **CFG)
    prompts = ["a man and a woman", "on grass a woman hugs a tall man"]
    plain, batch, job, model, generation, weights = _run(tmp_path, monkeypatch, cfg, prompts=prompts, seeds=[7, 8],
                                                          latent=latent, split=True)  # Forge's memory-split calls
    generation.keep_pictures(torch.rand(2, 3, latent[0] * 8, latent[1] * 8))
    assert job.calls == 6 and job.extra_generation_params["OMG mode"] == "fast" and len(generation.layout_images) == 2
    assert not torch.equal(batch, plain)
    _assert_untouched(model, weights, model.forge_objects_after_applying_lora.unet)
    for i in range(2):
        _, alone, *_ = _run(tmp_path, monkeypatch, cfg, prompts=prompts[i:i + 1], seeds=[7 + i], latent=latent)
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-3, atol=1e-3)  # float noise of a batch ~1e-4


def _controlnet(strength):
    return lambda model, latent: RowResidualControl(model.forge_objects.unet.model.diffusion_model, latent, CTX, strength)


def _calls_with_control(model, monkeypatch):
    """Every UNet call's (x, the middle block's ControlNet residual): a spy on Forge's ``apply_model``."""
    calls, kmodel = [], model.forge_objects.unet.model
    apply_model = kmodel.apply_model

    def spy(x, t, control=None, **kwargs):
        calls.append((x.clone(), control["middle"][0].clone()))
        return apply_model(x, t, control=control, **kwargs)

    monkeypatch.setattr(kmodel, "apply_model", spy)
    return calls


@torch.no_grad()
@pytest.mark.parametrize("mode", ["two passes", "one pass", "fast"])
def test_a_controlnet_reaches_every_row_with_its_host_rows_residuals(tmp_path, monkeypatch, mode):
    """Forge computes ControlNet residuals for its own rows; every OMG row gets its host row's."""
    cfg = OmgConfig(blend_start=0.5, mode=mode, **CFG)
    prompts, latent = ["a man and a woman", "on grass a woman hugs a tall man"], (12, 16)
    calls = []

    def control(model, shape):
        calls.append(_calls_with_control(model, monkeypatch))
        return _controlnet(1.0)(model, shape)

    plain, final, job, model, generation, weights = _run(tmp_path, monkeypatch, cfg, control=control, prompts=prompts,
                                                         seeds=[7, 8], latent=latent)
    _assert_untouched(model, weights, model.forge_objects_after_applying_lora.unet)
    omg_calls = calls[0][job.steps:]  # after the plain job's
    rows = [(x[r], residual[r]) for x, residual in omg_calls for r in range(x.shape[0])]
    own = [torch.allclose(res, job.control.residual(x[None], res.shape)[0], atol=1e-6) for x, res in rows]
    blending = job.steps // 2
    if mode == "fast":  # one pass, the host's 4 rows: each its own residual
        assert len(rows) == job.steps * 4 and all(own)
    elif mode == "one pass":  # the host's 4 rows, then per blending step 2 images x (host uncond + 2 concepts)
        assert len(rows) == (job.steps - blending) * 4 + blending * 6 and all(own)
    else:  # pass 1 (4 rows), then per blending step 2 images x (2 host + 2 concepts, guided by the host's uncond)
        # the layout comes from pass 1's kept attention (no reference row): every row has its own residual
        assert len(rows) == job.steps * 4 + blending * 8 and all(own)
    # the ControlNet changes the OMG image as it changes Forge's own (strength 0 = none at all)
    _, without, *_ = _run(tmp_path, monkeypatch, cfg, control=_controlnet(0.0), prompts=prompts, seeds=[7, 8], latent=latent)
    _, no_control, *_ = _run(tmp_path, monkeypatch, cfg, prompts=prompts, seeds=[7, 8], latent=latent)
    assert torch.equal(without, no_control) and (final - without).abs().max() > 0.05


def _two_units(concept_unit):
    """A ``_run`` ControlNet: Forge's chain of unit 0 (strength 1) and unit 1 (strength 2), and the ControlNet
    script the job carries (its panel: both enabled; per enabled unit the loaded model)."""
    def control(model, latent):
        unet = model.forge_objects.unet.model.diffusion_model
        first = RowResidualControl(unet, latent, CTX, 1.0)
        second = RowResidualControl(unet, latent, CTX, 2.0, previous=first)  # Forge prepends: the last unit is the head
        second.control_model = first.control_model  # one model file in both units: Forge's cache shares the network
        params = {i: types.SimpleNamespace(model=types.SimpleNamespace(model_patcher=types.SimpleNamespace(control_model=u.control_model)))
                  for i, u in enumerate((first, second))}
        script = types.SimpleNamespace(title=lambda: "ControlNet", args_from=0, args_to=2, current_params=params)
        control.script = script
        return second
    control.concept_unit = concept_unit
    return control


@torch.no_grad()
def test_a_concepts_own_controlnet_unit_acts_on_its_rows_only(tmp_path, monkeypatch):
    """Unit 1 is concept 1's: its rows get units 0 + 1, every other row unit 0 alone."""
    concepts = [ConceptSpec(**{**vars(CFG["concepts"][0]), "control_unit": 1}), CFG["concepts"][1]]
    cfg = OmgConfig(**{**CFG, "concepts": concepts}, blend_start=0.5)
    calls, control = [], _two_units(1)

    def with_spy(model, latent):
        calls.append(_calls_with_control(model, monkeypatch))
        return control(model, latent)

    def job_with_script(job):
        job.scripts = types.SimpleNamespace(alwayson_scripts=[control.script])
        job.script_args = [{"enabled": True}, {"enabled": True}]

    plain, final, job, model, generation, weights = _run(tmp_path, monkeypatch, cfg, control=with_spy, prompts=["a man and a woman"] * 2,
                                                         seeds=[7, 8], latent=(12, 16), before_omg=job_with_script)
    assert isinstance(final, torch.Tensor)
    _assert_untouched(model, weights, model.forge_objects_after_applying_lora.unet)
    first = job.control.previous_controlnet
    rows = [(x[r], residual[r]) for x, residual in calls[0][job.steps:] for r in range(x.shape[0])]

    def alone(x, shape, strength):
        return strength * first.residual(x[None], shape)[0]

    both = [torch.allclose(res, alone(x, res.shape, 3.0), atol=1e-5) for x, res in rows]
    unit0 = [torch.allclose(res, alone(x, res.shape, 1.0), atol=1e-5) for x, res in rows]
    blending = job.steps // 2
    assert both.count(True) == blending * 2  # concept 1's cond rows: one per image per blending step
    assert unit0.count(True) == len(rows) - blending * 2  # all the rest
    # without a unit of its own, concept 1's rows get both units like every row
    cfg_global = OmgConfig(**CFG, blend_start=0.5)
    _, everywhere, *_ = _run(tmp_path, monkeypatch, cfg_global, control=_two_units(-1), prompts=["a man and a woman"] * 2,
                             seeds=[7, 8], latent=(12, 16))
    assert (final - everywhere).abs().max() > 0.05


@torch.no_grad()
def test_a_concept_unit_that_is_not_there_is_named(tmp_path, monkeypatch):
    concepts = [ConceptSpec(**{**vars(CFG["concepts"][0]), "control_unit": 2}), CFG["concepts"][1]]
    control = _two_units(2)

    def job_with_script(job):
        control(job.sd_model, (16, 16))
        job.scripts = types.SimpleNamespace(alwayson_scripts=[control.script])
        job.script_args = [{"enabled": True}, {"enabled": False}, {"enabled": False}]

    with pytest.raises(forge.OmgUserError, match="OMG concept 1: ControlNet unit 2 is not enabled"):
        _run(tmp_path, monkeypatch, OmgConfig(**{**CFG, "concepts": concepts}), before_omg=job_with_script)


@torch.no_grad()
def test_with_a_controlnet_blend_start_one_still_gives_forges_own_image_bitwise(tmp_path, monkeypatch):
    plain, final, *_ = _run(tmp_path, monkeypatch, OmgConfig(blend_start=1.0, **CFG), control=_controlnet(1.0))
    assert torch.equal(final, plain)


def _image_prompt_patch(seen):
    """IP-Adapter's attn2 replace patch as Forge's extension works: the plain attention plus an image
    prompt's, cond or uncond per chunk of rows by ``cond_or_uncond`` (here a constant per chunk)."""
    from tests.support.fake_forge.attention import attention_function

    def patch(q, k, v, extra_options):
        marks = extra_options["cond_or_uncond"]
        per_chunk = q.shape[0] // len(marks)
        seen.append((q.shape[0], list(marks)))
        added = torch.cat([torch.full((per_chunk, 1, 1), 0.3 if m == 0 else -0.2) for m in marks])
        return attention_function(q, k, v, extra_options["n_heads"]) + added

    return patch


@torch.no_grad()
@pytest.mark.parametrize("first", ["ip-adapter", "omg"])
def test_an_ip_adapter_patch_acts_on_every_row_with_its_own_cond_mark_whichever_script_runs_first(tmp_path, monkeypatch, first):
    seen = []

    def ip_adapter_script(p, **kwargs):  # Forge's IP-Adapter: per block (SD1.5: no transformer index), on a clone
        clone = p.sd_model.forge_objects.unet.clone()
        for block, number in [("input", 1), ("input", 2), ("middle", 0), ("output", 3)]:
            clone.set_model_patch_replace(_image_prompt_patch(seen), "attn2", block, number)
        p.sd_model.forge_objects.unet = clone

    def run(cfg, with_ip=True):
        model = _ForgeModel()
        _write_lora(tmp_path / "hero.safetensors", model)
        monkeypatch.setitem(sys.modules, "networks", _networks(tmp_path / "hero.safetensors"))
        with fake_forge.installed() as modules:
            if cfg is None:  # no OMG at all
                job = _Job(modules, model, prompts=["a man and a woman"] * 2, seeds=[7, 8])
                c, uc = model.get_learned_conditioning(job.prompts), model.get_learned_conditioning(job.negative_prompts)
            else:
                job, generation, c, uc = _omg_job(modules, model, cfg, prompts=["a man and a woman"] * 2, seeds=[7, 8])
            if with_ip:
                job.hooks.insert(0 if first == "ip-adapter" else len(job.hooks), ip_adapter_script)
            return job.sample(c, uc, job.seeds, job.subseeds, 0, job.prompts), model

    plain, _ = run(OmgConfig(blend_start=1.0, **CFG))
    assert seen and all(marks == [1, 1, 0, 0] for _, marks in seen)  # pass 1: Forge's rows, one chunk per row
    seen.clear()
    blended, model = run(OmgConfig(blend_start=0.5, **CFG))
    assert not any(m._forward_hooks for m in model.forge_objects.unet.model.modules())
    assert all(rows == len(marks) for rows, marks in seen)  # every engine call: one chunk per row
    # pass 2 (shared guidance): per image 1 cond host + 2 concept rows marked cond, 1 uncond host row
    assert max((marks.count(0), marks.count(1)) for _, marks in seen) == (6, 2)
    without, _ = run(OmgConfig(blend_start=0.5, **CFG), with_ip=False)
    assert (blended - without).abs().max() > 0.05  # the image prompt acts with OMG on
    assert torch.equal(plain, run(None)[0])  # blend start 1 with the patch: Forge's own image with it, bit for bit


@torch.no_grad()
def test_pass2_is_cut_to_what_forges_free_memory_holds_and_makes_the_same_image(tmp_path, monkeypatch):
    from tests.support.fake_forge import memory
    sessions = []

    class RecordedSession(a1111.OmgSession):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sessions.append(self)

    monkeypatch.setattr(a1111, "OmgSession", RecordedSession)
    cfg = OmgConfig(blend_start=0.5, **CFG)
    _, whole, *_ = _run(tmp_path, monkeypatch, cfg, prompts=["a man and a woman"] * 2, seeds=[7, 8])
    monkeypatch.setattr(memory, "FREE_BYTES", 1 << 20)  # 1 MB "free": a few tiny-UNet rows per call
    _, cut, *_ = _run(tmp_path, monkeypatch, cfg, prompts=["a man and a woman"] * 2, seeds=[7, 8])
    big, small = sessions
    per_row = small.memory.row_bytes(cut.shape[-2:])
    assert small.row_limit.budget == max(int((1 << 20) * 0.8) // per_row, 1) < 8
    assert big.row_limit.budget > 8  # 2 images x (2 + 2 x 2) rows fit in 8 GB
    torch.testing.assert_close(cut, whole, rtol=1e-3, atol=1e-3)


@torch.no_grad()
def test_a_truncated_lora_is_named_before_forge_reads_it_and_the_folder_is_untouched(tmp_path, monkeypatch):
    """Forge's own loader would fail with "File corrupted" and rename the file to .corrupted."""
    model = _ForgeModel()
    path = tmp_path / "hero.safetensors"
    _write_lora(path, model)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    listing = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.iterdir())
    networks, read = _networks(path), []
    networks.load_lora_state_dict = read.append
    monkeypatch.setitem(sys.modules, "networks", networks)
    original = model.forge_objects.unet
    with fake_forge.installed() as modules:
        job, generation, c, uc = _omg_job(modules, model, OmgConfig(**CFG))
        with pytest.raises(forge.OmgUserError, match=r"^OMG: LoRA 'hero': hero.safetensors is truncated: \d+ bytes of \d+ bytes — download it again$"):
            job.sample(c, uc, job.seeds, job.subseeds, 0, job.prompts)
    assert read == [] and model.forge_objects.unet is original
    assert sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.iterdir()) == listing



@torch.no_grad()
@pytest.mark.parametrize("backend", ["backend", "ldm_patched"])
@pytest.mark.parametrize("foreign, refused", [(3, False), (4, True)])
def test_a_lora_whose_layers_mostly_miss_this_checkpoint_is_refused(tmp_path, monkeypatch, backend, foreign, refused):
    """A LoRA for another model family shares a few layer names (and shapes) with this checkpoint: its three
    layers here plus ``foreign`` layers this UNet lacks; refused when fewer than half of them fit, and the
    model stays as it was."""
    model = _ForgeModel(backend=backend)
    path = tmp_path / "hero.safetensors"
    _write_lora(path, model)
    extra = {f"lora_unet_output_blocks_{20 + i}_1_proj_in.{part}.weight": torch.zeros(4, 4) for i in range(foreign)
             for part in ("lora_up", "lora_down")}
    save_file({**load_file(str(path)), **extra}, str(path))
    monkeypatch.setitem(sys.modules, "networks", _networks(path))
    original = model.forge_objects.unet
    with fake_forge.installed(backend) as modules:
        job, generation, c, uc = _omg_job(modules, model, OmgConfig(**CFG))
        with pytest.raises(forge.OmgUserError, match=rf"^OMG: LoRA 'hero' fits only 3 of its {3 + foreign} layers to this "
                                                     r"checkpoint \(made for another architecture\?\)$") if refused else contextlib.nullcontext():
            job.sample(c, uc, job.seeds, job.subseeds, 0, job.prompts)
    assert model.forge_objects.unet is original

def _omg_job(modules, model, cfg, **job_args):
    """A Forge job with OMG attached as the Script does it: (job, generation, cond, uncond)."""
    job = _Job(modules, model, **job_args)
    generation = forge.ForgeGeneration(job, cfg)
    generation.attach()
    job.hooks.append(lambda p, **kwargs: generation.patch_unet())
    return job, generation, model.get_learned_conditioning(job.prompts), model.get_learned_conditioning(job.negative_prompts)


def _assert_untouched(model, weights, original_unet):
    unet_model = model.forge_objects.unet.model
    assert model.forge_objects.unet is original_unet and model.forge_objects_after_applying_lora.unet is original_unet
    assert original_unet.model_options == {"transformer_options": {}}
    assert not any(m._forward_hooks for m in unet_model.modules())
    assert not any("forward" in m.__dict__ for m in unet_model.modules())
    now = {k: v for k, v in unet_model.state_dict().items()}
    now.update({"te." + k: v for k, v in model.encoder.state_dict().items()})
    assert all(torch.equal(now[k], v) for k, v in weights.items())


@torch.no_grad()
@BACKENDS
def test_blend_start_one_gives_forges_own_image_bitwise(tmp_path, monkeypatch, backend):
    plain, final, job, model, generation, weights = _run(tmp_path, monkeypatch, OmgConfig(blend_start=1.0, **CFG), backend=backend)
    assert torch.equal(final, plain)
    assert job.calls == 12  # pass 1 and pass 2 each call the denoiser 6 times
    generation.keep_pictures(torch.rand(1, 3, 64, 64))
    assert generation.prepared is not None and len(generation.layout_images) == 1  # the masks were made and shown
    _assert_untouched(model, weights, model.forge_objects_after_applying_lora.unet)


@torch.no_grad()
@pytest.mark.parametrize("guidance", ["shared", "own"])
@pytest.mark.parametrize("backend", ["backend", "neo", "ldm_patched"])
def test_a_whole_job_blends_uses_the_lora_and_restores_everything(tmp_path, monkeypatch, guidance, backend):
    cfg = dict(CFG, background="pass 1")  # the default
    plain, final, job, model, generation, weights = _run(tmp_path, monkeypatch, OmgConfig(blend_start=0.5, concept_guidance=guidance, **cfg),
                                                         backend=backend)
    assert generation.backend.name == ("Forge Classic / reForge" if backend == "ldm_patched" else "Forge")
    assert isinstance(final, torch.Tensor) and not torch.equal(final, plain)
    _assert_untouched(model, weights, model.forge_objects_after_applying_lora.unet)
    assert job.extra_generation_params["OMG c1 lora"] == "hero" and job.extra_generation_params["OMG c1 lora hash"] == "0123456789ab"
    concept = generation.prepared.concepts[0]
    assert sorted(concept.deltas) == [TO_K, PROJ_IN]
    assert isinstance(concept.deltas[TO_K], LowRankDelta) and isinstance(concept.deltas[PROJ_IN], DenseDelta)
    # the concept prompt was encoded with the text-encoder LoRA at its weight, on a clone of the CLIP patcher
    te = model.encoder
    lora_te = copy.deepcopy(te)
    sd = load_file(str(tmp_path / "hero.safetensors"))
    lora_te.proj.weight += 0.7 * sd["lora_te_proj.lora_up.weight"] @ sd["lora_te_proj.lora_down.weight"]
    torch.testing.assert_close(concept.cond["c_crossattn"], lora_te.encode("a man, red cape"), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(concept.cond["c_crossattn"], te.encode("a man, red cape"))
    # split calls (one chunk per call) give the same image: the row roles follow cond_or_uncond
    # (batch composition changes float rounding only; wrong roles would change the image like OMG itself does)
    _, split_final, *_ = _run(tmp_path, monkeypatch, OmgConfig(blend_start=0.5, concept_guidance=guidance, **cfg), split=True,
                              backend=backend)
    rounding, omg_effect = (split_final - final).abs().max(), (final - plain).abs().max()
    assert rounding < 1e-3 and omg_effect > 100 * rounding, (rounding, omg_effect)


def _rescale_a_files_text_encoder_patches(path: str):
    """Regional Prompter's leftover hook (its ``forge_linear_forward`` on the text encoder's first layer): before each
    encode, the patches of the patcher's LoRA whose name contains ``path`` get strength 0 (its last job's region)."""

    def install(job):
        model, encode = job.sd_model, job.sd_model.get_learned_conditioning

        def rescaled(prompts):
            for (name, *_), patches in model.forge_objects.clip.patcher.lora_patches.items():
                for entries in patches.values():
                    if name and path in name:
                        entries[0][0] = 0.0
            return encode(prompts)

        model.get_learned_conditioning = rescaled

    return install


@torch.no_grad()
def test_a_hook_that_rescales_a_lora_files_text_encoder_patches_by_its_name_leaves_omgs_concept_encodings_alone(tmp_path, monkeypatch):
    cfg = OmgConfig(blend_start=0.5, **CFG)
    _, final, _, _, generation, _ = _run(tmp_path, monkeypatch, cfg)
    path = str(tmp_path / "hero.safetensors")
    _, hooked, _, _, hooked_generation, _ = _run(tmp_path, monkeypatch, cfg, before_omg=_rescale_a_files_text_encoder_patches(path))
    assert torch.equal(hooked_generation.prepared.concepts[0].cond["c_crossattn"], generation.prepared.concepts[0].cond["c_crossattn"])
    assert torch.equal(hooked, final)


@torch.no_grad()
def test_a_checkpoint_with_fp8_manual_cast_layers_blends_and_is_left_as_it_was(tmp_path, monkeypatch):
    plain, final, *_ = _run(tmp_path, monkeypatch, OmgConfig(blend_start=1.0, **CFG), fp8=True)
    assert torch.equal(final, plain)  # blend start 1: Forge's own image, bit for bit
    plain, final, job, model, generation, weights = _run(tmp_path, monkeypatch, OmgConfig(blend_start=0.5, **CFG), fp8=True)
    assert isinstance(final, torch.Tensor) and (final - plain).abs().max() > 0.01
    assert isinstance(generation.prepared.concepts[0].deltas[TO_K], LowRankDelta)
    assert model.forge_objects.unet.model.diffusion_model.get_submodule(TO_K).weight.dtype == torch.float8_e4m3fn
    _assert_untouched(model, weights, model.forge_objects_after_applying_lora.unet)


@torch.no_grad()
def test_a_failure_in_either_pass_leaves_forge_as_it_was(tmp_path, monkeypatch):
    for fail_at in (3, 9):  # pass 1, pass 2
        _, final, _, model, generation, weights = _run(tmp_path, monkeypatch, OmgConfig(blend_start=0.5, **CFG), fail_at_call=fail_at)
        assert isinstance(final, RuntimeError) and str(final) == "sampler failed"
        _assert_untouched(model, weights, model.forge_objects_after_applying_lora.unet)
        assert generation.session is None and not generation.swapped


@pytest.mark.parametrize("backend", ["backend", "neo", "ldm_patched"])
def test_forge_lora_patches_become_deltas_equal_to_forges_merge(backend):
    """Plain LoRA as Forge's tuple or reForge's and Neo's ``LoRAAdapter`` becomes a low-rank delta; a diff, the host's merge."""
    unet = forge_unet(CTX, seed=0)
    to_k, proj_in = unet.get_submodule(TO_K), unet.get_submodule(PROJ_IN)
    g = torch.Generator().manual_seed(1)
    up, down = torch.randn(to_k.out_features, 4, generator=g), torch.randn(4, to_k.in_features, generator=g)
    lora = ("lora", (up, down, 2.0, None, None)) if backend == "backend" else LoRAAdapter((up, down, 2.0, None, None, None))
    diff = ("diff", (torch.randn(proj_in.weight.shape, generator=g),))
    host = forge_backend.LdmPatchedBackend() if backend == "ldm_patched" else forge_backend.ForgeBackend()
    with fake_forge.installed(backend):
        deltas = forge_lora.unet_deltas({f"diffusion_model.{TO_K}.weight": lora, f"diffusion_model.{PROJ_IN}.weight": diff}, unet, 0.8,
                                   _merge(host, 0.8))
        for name, patch in ((TO_K, lora), (PROJ_IN, diff)):
            weight = unet.get_submodule(name).weight
            expected = merge_lora_to_weight([[0.8, patch, 1.0, None, None]], weight.detach()) - weight.detach()
            delta = deltas[name]
            got = delta.dense() if isinstance(delta, LowRankDelta) else delta.weight
            torch.testing.assert_close(got.reshape(expected.shape), expected, rtol=1e-5, atol=1e-6)
        assert isinstance(deltas[TO_K], LowRankDelta) and deltas[TO_K].scale == pytest.approx(0.8 * 2.0 / 4)
        with pytest.raises(ValueError, match="unsupported patch target"):
            forge_lora.unet_deltas({("diffusion_model.x.weight", (0, 0, 4)): lora}, unet, 1.0, _merge(host, 1.0))
        with pytest.raises(ValueError, match="factors give"):
            forge_lora.unet_deltas({f"diffusion_model.{PROJ_IN}.weight": lora}, unet, 1.0, _merge(host, 1.0))


def test_plain_low_rank_reads_every_backends_lora_and_leaves_the_rest_dense():
    up, down, scale = torch.ones(3, 2), torch.ones(2, 5), torch.ones(3, 1)
    assert forge_backend.plain_low_rank(("lora", (up, down, 1.0, None))) == (up, down, 1.0, None)  # Classic
    assert forge_backend.plain_low_rank(("lora", (up, down, None, None, None)))[:2] == (up, down)  # Forge
    assert forge_backend.plain_low_rank(LoRAAdapter((up, down, 4.0, None, None, None)))[2] == 4.0  # reForge
    assert forge_backend.plain_low_rank(("lora", (up, down, 1.0, None, scale))) is None  # DoRA: dense
    assert forge_backend.plain_low_rank(LoRAAdapter((up, down, 1.0, None, None, [3, 5]))) is None  # reshaped: dense
    assert forge_backend.plain_low_rank(("loha", (up, down, 1.0, up, down, None, None, None))) is None
    assert forge_backend.plain_low_rank(("diff", (up,))) is None


@torch.no_grad()
def test_rows_are_routed_through_forges_manual_cast_fp8_layers():
    """ForgeOperations.Linear is no nn.Linear; its fp8 weight is cast (and scaled) per call."""
    unet = with_forge_linears(forge_unet(CTX, seed=0), torch.float8_e4m3fn, scale=0.5)
    to_k, to_v = unet.get_submodule(TO_K), unet.get_submodule(TO_K[:-1] + "v")
    assert isinstance(to_k, ForgeLinear) and not isinstance(to_k, nn.Linear) and to_k.weight.dtype == torch.float8_e4m3fn
    g = torch.Generator().manual_seed(2)
    up, down = torch.randn(to_k.out_features, 2, generator=g), torch.randn(2, to_k.in_features, generator=g)
    replacement = torch.randn(to_v.out_features, to_v.in_features, generator=g)
    patches = {f"diffusion_model.{TO_K}.weight": ("lora", (up, down, None, None, None)),
               f"diffusion_model.{TO_K[:-1]}v.weight": ("set", (replacement,))}  # "set" depends on the (scaled) base
    with fake_forge.installed():
        deltas = forge_lora.unet_deltas(patches, unet, 0.6, _merge(forge_backend.ForgeBackend(), 0.6))
    router = RowRoutedLoRA(dict(unet.named_modules()), [deltas])
    x = torch.randn(3, 5, to_k.in_features, generator=g, dtype=torch.bfloat16)
    for layer, expected_weight in ((to_k, to_k.weight.float() * 0.5 + 0.6 * up @ down), (to_v, replacement)):
        with router.installed(), router.route([(0, 1, 3)], batch=3):
            routed = layer(x)
        plain = layer(x)
        assert routed.dtype == torch.bfloat16 and torch.equal(routed[0], plain[0])
        expected = nn.functional.linear(x[1:].float(), expected_weight)
        assert not torch.allclose(plain[1:].float(), expected, atol=0.1)
        torch.testing.assert_close(routed[1:].float(), expected, rtol=0.03, atol=0.05)


@torch.no_grad()
@BACKENDS
def test_a_concept_prompt_is_encoded_on_a_cloned_clip_patcher_and_the_weights_come_back_at_once(backend):
    model = _ForgeModel(backend=backend)
    original, proj = model.forge_objects.clip, model.encoder.proj
    before = proj.weight.clone()
    delta = torch.full_like(before, 0.1)
    with fake_forge.installed(backend):
        host = forge_backend.forge_backend()
        assert isinstance(host, forge_backend.LdmPatchedBackend) == (backend == "ldm_patched")
        for fail in (False, True):
            with pytest.raises(RuntimeError, match="inside") if fail else contextlib.nullcontext():
                with forge_lora.clip_patched(host, model.forge_objects, {"proj.weight": ("diff", (delta,))}, "hero.safetensors", 0.5):
                    assert model.forge_objects.clip is not original and original.patcher.patches == {}
                    model.get_learned_conditioning(["a man"])  # the host loads the clone: its patch is merged
                    torch.testing.assert_close(model.encoder.proj.weight, before + 0.05)
                    if fail:
                        raise RuntimeError("inside")
            assert model.forge_objects.clip is original
            assert torch.equal(model.encoder.proj.weight, before), "restored before any other encode"


@torch.no_grad()
def test_patching_is_idempotent_and_survives_forges_deep_copies(tmp_path, monkeypatch):
    model = _ForgeModel()
    _write_lora(tmp_path / "hero.safetensors", model)
    monkeypatch.setitem(sys.modules, "networks", _networks(tmp_path / "hero.safetensors"))
    original = model.forge_objects.unet
    with fake_forge.installed() as modules:
        job = _Job(modules, model)
        generation = forge.ForgeGeneration(job, OmgConfig(self_attention_until=0.3, **CFG))
        generation.prepared = generation.prepare()
        from omg_ext.engine.session import OmgSession
        session = OmgSession(generation.unet, generation.prepared.concepts, images=1, image_tokens=generation.image_tokens(job.prompts))
        with generation.patched(session):
            generation.patch_unet()
            clone = model.forge_objects.unet
            generation.patch_unet()  # the hook runs twice before a hires pass
            assert model.forge_objects.unet is clone and clone is not original and len(generation.swapped) == 1
            options = clone.clone().model_options  # another extension clones after us: a deep copy
            assert options["model_function_wrapper"] is generation.wrapper
            assert "patches_replace" not in options["transformer_options"]  # OMG's patches live in each call's options
            call = generation.call_options({"cond_or_uncond": [1, 0]}, torch.tensor([0.0, 1.0, 0.0]))
            patches = call["patches_replace"]
            assert patches["attn2"][("input", 1, 0)] is generation.patches[0]
            assert patches["attn1"][("output", 7, 0)] is generation.patches[1]
            assert call["cond_or_uncond"] == [0, 1, 0] and call["cond_indices"] == [0, 2] and call["uncond_indices"] == [1]
            assert generation.call_options({}, torch.zeros(1))["patches_replace"] is patches  # built once
        assert model.forge_objects.unet is original and original.model_options == {"transformer_options": {}}


@torch.no_grad()
def test_another_extensions_idle_wrapper_runs_inside_omgs_calls_and_one_that_tiles_is_refused(tmp_path, monkeypatch):
    """Regional Prompter leaves its UNet wrapper on Forge's patcher after its first job (idle from then on):
    OMG runs it inside each of its calls, as it runs without OMG, and gives the image it gives without it. A
    wrapper that calls the UNet on tiles of its input (MultiDiffusion) cannot work with OMG's rows: refused."""
    cfg = OmgConfig(blend_start=0.5, **CFG)
    alone = _run(tmp_path, monkeypatch, cfg)[1]
    seen = []

    def idle(apply_model, args):
        seen.append((args["input"].shape[0], list(args["cond_or_uncond"])))
        return apply_model(args["input"], args["timestep"], **args["c"])

    def tiles(apply_model, args):
        x, halves = args["input"], []
        for part in x.split(x.shape[-1] // 2, dim=-1):
            halves.append(apply_model(part, args["timestep"], **args["c"]))
        return torch.cat(halves, dim=-1)

    def leave(wrapper):
        return lambda job: job.sd_model.forge_objects_after_applying_lora.unet.set_model_unet_function_wrapper(wrapper)

    final = _run(tmp_path, monkeypatch, cfg, before_omg=leave(idle))[1]
    assert torch.equal(final, alone)
    assert max(rows for rows, _ in seen) == 4 and all(rows == len(marks) for rows, marks in seen)  # OMG's pass-2 calls
    with pytest.raises(forge.OmgUserError, match="another extension that wraps Forge's UNet function and changes its input.*tiles"):
        _run(tmp_path, monkeypatch, cfg, before_omg=leave(tiles))


@torch.no_grad()
def test_conflicts_and_unsupported_models_fail_with_a_clear_message(tmp_path, monkeypatch):
    model = _ForgeModel()
    _write_lora(tmp_path / "hero.safetensors", model)
    monkeypatch.setitem(sys.modules, "networks", _networks(tmp_path / "hero.safetensors"))

    def tiled(apply_model, args):
        return apply_model(args["input"], args["timestep"], **args["c"])

    # a script after ours puts its own wrapper on (a clone of) our clone: named after pass 1, not "no UNet call"
    model = _ForgeModel()
    monkeypatch.setitem(sys.modules, "networks", _networks(tmp_path / "hero.safetensors"))
    with fake_forge.installed() as modules:
        job = _Job(modules, model)
        generation = forge.ForgeGeneration(job, OmgConfig(**CFG))
        generation.attach()

        def later_script(p, **kwargs):
            clone = p.sd_model.forge_objects.unet.clone()
            clone.set_model_unet_function_wrapper(tiled)
            p.sd_model.forge_objects.unet = clone

        job.hooks += [lambda p, **kwargs: generation.patch_unet(), later_script]
        c, uc = model.get_learned_conditioning(job.prompts), model.get_learned_conditioning(job.negative_prompts)
        with pytest.raises(forge.OmgUserError, match="another extension that wraps Forge's UNet function .*tiled"):
            job.sample(c, uc, job.seeds, job.subseeds, 0, job.prompts)
    with pytest.raises(forge.OmgUserError, match="does not support Flux"):
        forge.check_model(type("Flux", (), {"is_sd1": False, "is_sdxl": False})())
    with pytest.raises(forge.OmgUserError, match="SD1.5 and SDXL checkpoints, not StableDiffusion3"):
        forge.check_model(type("StableDiffusion3", (), {})())


@torch.no_grad()
@BACKENDS
def test_forges_layout_from_kept_attention_is_the_reference_rows_layout(tmp_path, monkeypatch, backend):
    """Forge's attention patches keep pass 1's cross-attention outputs by transformer block; pass 2's host cond
    rows take them back: the reference rows' image, without the reference rows. (Setting "Preserve layout" off
    gives another image: before, the setting reached no session.)"""
    run = dict(prompts=["a man and a woman", "on grass a woman hugs a tall man"], seeds=[7, 8], latent=(12, 16),
               backend=backend)
    cfg = OmgConfig(blend_start=0.2, **CFG)
    _, kept, *_ = _run(tmp_path, monkeypatch, cfg, **run)
    _, none, *_ = _run(tmp_path, monkeypatch, OmgConfig(blend_start=0.2, layout_preservation=False, **CFG), **run)
    monkeypatch.setattr(a1111, "OmgSession", functools.partial(a1111.OmgSession, keep_attention=False))
    _, reference, *_ = _run(tmp_path, monkeypatch, cfg, **run)
    assert (kept - reference).abs().max() * 50 < (kept - none).abs().max()  # batch composition ~4e-5, layout ~1e-2


def test_an_ip_adapter_entry_given_to_a_concept_adds_its_term_to_that_concepts_rows_only():
    from omg_ext.engine.attention import AttentionState, ProjectedAttention
    from tests.support.fake_forge.attention import attention_function
    from tests.support.fake_forge.ip_adapter import CrossAttentionPatch
    patch = CrossAttentionPatch(1.0, 0.3, -0.2)  # unit A: every row
    patch.set_new_condition(2.0, 5.0, -1.0)  # unit B: concept 0's rows only
    patch.set_new_condition(1.0, 0.07, 0.01)  # unit C: every row
    around = forge_attention.AroundPatch(ProjectedAttention(AttentionState(), True, attention_function), patch, {1: 0})
    q, k, v = (torch.randn(5, 6, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    extra = {"n_heads": 2, "dim_head": 4, "cond_or_uncond": [0, 1, 0, 1, 0],
             forge_attention.ROW_CONCEPTS: torch.tensor([-1.0, -1.0, 0.0, 0.0, 1.0])}
    added = around(q, k, v, extra) - attention_function(q, k, v, 2)
    expected = torch.tensor([0.37, -0.19, 10.37, -2.19, 0.37])  # host cond, host uncond, concept 0 cond/uncond, concept 1
    torch.testing.assert_close(added, expected.view(-1, 1, 1).expand_as(added), rtol=0, atol=1e-5)
    assert len(patch.weights) == 3 and patch.conds == [0.3, 5.0, 0.07]  # theirs untouched: filtered copies
    without_marks = around(q, k, v, {k_: v_ for k_, v_ in extra.items() if k_ != forge_attention.ROW_CONCEPTS})
    torch.testing.assert_close(without_marks - attention_function(q, k, v, 2),
                               torch.tensor([0.37, -0.19, 0.37, -0.19, 0.37]).view(-1, 1, 1).expand_as(added), rtol=0, atol=1e-5)


def _control_script(*kinds):
    """The ControlNet script of a job whose panel has one enabled unit per kind ("controlnet" or "ip-adapter")."""
    params = {}
    for i, kind in enumerate(kinds):
        model = (types.SimpleNamespace(ip_adapter={}) if kind == "ip-adapter" else
                 types.SimpleNamespace(model_patcher=types.SimpleNamespace(control_model=nn.Linear(1, 1))))
        params[i] = types.SimpleNamespace(model=model)
    script = types.SimpleNamespace(title=lambda: "ControlNet", args_from=0, args_to=len(kinds), current_params=params)
    return script, [{"enabled": True} for _ in kinds]


def test_concept_units_are_told_apart_by_kind_and_an_ip_adapter_unit_by_its_place_among_ip_adapters():
    script, args = _control_script("ip-adapter", "controlnet", "ip-adapter", "controlnet")
    p = types.SimpleNamespace(scripts=types.SimpleNamespace(alwayson_scripts=[script]), script_args=args)
    units, image_prompts = forge_controlnet.controlnet_unit_modules(p, {0: 2, 1: 3, 2: 0})
    assert image_prompts == {1: 0, 0: 2}  # unit 2 is the second IP-Adapter: entry 1
    assert list(units) == [1] and units[1].place == 1 and units[1].network is script.current_params[3].model.model_patcher.control_model
    script.current_params[1] = types.SimpleNamespace(model=types.SimpleNamespace())  # a unit of another kind (e.g. Revision)
    with pytest.raises(forge.OmgUserError, match="OMG concept 2: ControlNet unit 1 has neither a ControlNet nor an IP-Adapter model"):
        forge_controlnet.controlnet_unit_modules(p, {1: 1})


@torch.no_grad()
def test_a_concepts_own_ip_adapter_unit_reaches_its_rows_and_never_the_layout_pass(tmp_path, monkeypatch):
    """Two IP-Adapter units; the second is concept 1's: every OMG call runs it alone on concept 1's rows only."""
    from tests.support.fake_forge import ip_adapter
    seen = []
    called = ip_adapter.CrossAttentionPatch.__call__

    def spy(self, q, k, v, extra_options):
        seen.append((tuple(self.conds), extra_options.get(forge_attention.ROW_CONCEPTS)))
        return called(self, q, k, v, extra_options)

    monkeypatch.setattr(ip_adapter.CrossAttentionPatch, "__call__", spy)
    blocks = [("input", 1), ("input", 2), ("middle", 0), ("output", 3)]

    def with_units(entries, concept_unit):
        def before(job):
            def ip_adapter_script(p, **kwargs):
                clone = p.sd_model.forge_objects.unet.clone()
                for entry in entries:
                    ip_adapter.apply(clone, blocks, **entry)
                p.sd_model.forge_objects.unet = clone
            job.hooks.insert(0, ip_adapter_script)
            script, args = _control_script(*["ip-adapter"] * len(entries))
            job.scripts, job.script_args = types.SimpleNamespace(alwayson_scripts=[script]), args
        concepts = [ConceptSpec(**{**vars(CFG["concepts"][0]), "control_unit": concept_unit}), CFG["concepts"][1]]
        return OmgConfig(**{**CFG, "concepts": concepts}, blend_start=0.5), before

    face_a, face_b = {"weight": 1.0, "cond": 0.3, "uncond": -0.2}, {"weight": 1.0, "cond": 2.0, "uncond": -0.5}
    cfg, before = with_units([face_a, face_b], 1)
    plain, own, job, model, generation, weights = _run(tmp_path, monkeypatch, cfg, before_omg=before, seeds=[7, 8],
                                                       prompts=["a man and a woman"] * 2)
    assert not any(m._forward_hooks for m in model.forge_objects.unet.model.modules())  # (the IP-Adapter script swaps the patcher)
    omg_calls = [(conds, concepts) for conds, concepts in seen if concepts is not None]
    assert omg_calls and {conds for conds, _ in omg_calls} == {(0.3,), (2.0,)}  # never both units on one row
    assert all(bool((concepts == 0).any()) for conds, concepts in omg_calls if conds == (2.0,))
    first_blended = next(i for i, (_, concepts) in enumerate(omg_calls) if bool((concepts == 0).any()))
    assert first_blended > 0 and all(conds == (0.3,) for conds, _ in omg_calls[:first_blended])  # pass 1: unit A only
    seen.clear()
    _, everywhere, *_ = _run(tmp_path, monkeypatch, with_units([face_a, face_b], -1)[0], before_omg=with_units([face_a, face_b], -1)[1],
                             seeds=[7, 8], prompts=["a man and a woman"] * 2)
    _, without_b, *_ = _run(tmp_path, monkeypatch, with_units([face_a], -1)[0], before_omg=with_units([face_a], -1)[1],
                            seeds=[7, 8], prompts=["a man and a woman"] * 2)
    assert (own - everywhere).abs().max() > 0.05 and (own - without_b).abs().max() > 0.05
