"""The A1111 adapter against a stand-in of the ``modules.*`` surface it touches (tests/support/fake_a1111)."""
import json
import os
import sys
import types

import numpy
import pytest
import torch
from safetensors.torch import save_file
import torch.nn.functional as F
from torch import nn

from omg_ext.config import ConceptSpec, OmgConfig
from omg_ext.hosts import a1111, host_api, loras, pictures, row_tracker, webui_settings
from omg_ext.hosts.concept_cache import CONCEPTS
from omg_ext.engine.lora import DenseDelta, LowRankDelta
from omg_ext.engine.rows import RowRole
from tests.support import fake_a1111
from minisd.loras import merged
from minisd.sampling import DiscreteSchedule, SAMPLERS
from minisd.unet import TinyUNet

CTX = 64


class Params:
    """What ``on_cfg_denoiser`` hands the callback: ``text_cond`` / ``text_uncond``, the step and the steps."""

    def __init__(self, cond, uncond, step=0, steps=20):
        self.text_cond, self.text_uncond = cond, uncond
        self.sampling_step, self.total_sampling_steps = step, steps


def test_row_tracker_follows_the_denoisers_calls_and_checks_them():
    cond, uncond = torch.randn(2, 77, 8), torch.randn(2, 154, 8)
    tracker = row_tracker.RowTracker(images=2)
    tracker.on_denoiser(Params(cond, uncond))
    assert tracker.take(cond) == [RowRole(True, 0), RowRole(True, 1)]  # batch_cond_uncond off: cond call first
    assert tracker.take(uncond[:1]) == [RowRole(False, 0)]
    assert tracker.take(uncond[1:]) == [RowRole(False, 1)]
    tracker.on_denoiser(Params({"crossattn": cond, "vector": torch.zeros(2, 4)}, {"crossattn": uncond, "vector": torch.zeros(2, 4)}))
    padded = torch.cat([cond, torch.zeros(2, 77, 8)], dim=1)  # pad_cond_uncond: cond padded to uncond's length
    assert tracker.take(torch.cat([padded, uncond])) == [RowRole(True, 0), RowRole(True, 1), RowRole(False, 0), RowRole(False, 1)]
    tracker.on_denoiser(Params(cond, uncond))
    with pytest.raises(RuntimeError, match="conditioning does not match"):
        tracker.take(uncond[:, :77])
    with pytest.raises(a1111.OmgUserError, match="AND"):
        tracker.on_denoiser(Params(torch.randn(3, 77, 8), uncond))


def test_conditioning_with_nans_is_left_to_the_hosts_nan_check():
    """A checkpoint or text-encoder LoRA that overflows gives NaN conditioning: the rows are
    still followed, so the job fails with A1111's own NaN message, not "lost track"."""
    cond, uncond = torch.randn(1, 77, 8), torch.full((1, 77, 8), float("nan"))
    cond[0, 5:] = float("nan")
    tracker = row_tracker.RowTracker(images=1)
    tracker.on_denoiser(Params(cond, uncond))
    assert tracker.take(torch.cat([cond, uncond])) == [RowRole(True, 0), RowRole(False, 0)]
    tracker.on_denoiser(Params(cond, uncond))
    with pytest.raises(RuntimeError, match="conditioning does not match"):
        tracker.take(torch.cat([uncond, cond]))


class _Net:
    dyn_dim = None


class _LoraModule:
    """The attributes of A1111's ``NetworkModuleLora`` the adapter reads."""

    def __init__(self, sd_module, rank=2, alpha=1.0):
        self.sd_module, self.network = sd_module, _Net()
        self.up_model = nn.Linear(rank, sd_module.weight.shape[0], bias=False)
        self.down_model = nn.Linear(sd_module.weight.shape[1], rank, bias=False)
        self.mid_model, self.bias, self.dora_scale = None, None, None
        self.alpha, self.dim = alpha, rank

    def calc_scale(self):
        return self.alpha / self.dim

    def calc_updown(self, orig_weight):
        """Dense, scaled and multiplied, as the host's ``finalize_updown`` returns it."""
        multiplier = self.network.te_multiplier if getattr(self, "te", False) else self.network.unet_multiplier
        return (self.up_model.weight @ self.down_model.weight).reshape(orig_weight.shape) * self.calc_scale() * multiplier, None


class _HadaModule:
    """A type with only ``calc_updown`` (LoHa, LoKr…): returns (updown, ex_bias) with its multiplier applied."""

    def __init__(self, sd_module, multiplier):
        self.sd_module, self.network = sd_module, _Net()
        self.updown = torch.randn_like(sd_module.weight) * 0.1
        self.multiplier = multiplier

    def calc_updown(self, orig_weight):
        return self.updown * self.multiplier, None


def test_host_modules_become_low_rank_or_dense_deltas():
    layer = nn.Linear(8, 6)
    lora = _LoraModule(layer, rank=2, alpha=1.0)
    delta = loras.module_delta(lora, multiplier=0.8)
    assert isinstance(delta, LowRankDelta) and delta.scale == pytest.approx(0.4)
    torch.testing.assert_close(delta.dense(), lora.up_model.weight @ lora.down_model.weight * 0.4)
    lora.dora_scale = torch.ones(6, 1)  # DoRA needs the weight: dense
    hada = _HadaModule(layer, 0.5)
    for module in (lora, hada):
        if module is lora:
            module.calc_updown = lambda w: (torch.ones_like(w), None)
        assert isinstance(loras.module_delta(module, 0.5), DenseDelta)


class _Clip(nn.Module):
    """A text encoder with A1111's ``tokenize`` / ``tokenize_line`` and a Linear layer a LoRA can target.

    The vocabulary is shared by all instances, so a word has one id in every model a test builds.
    """

    vocab: dict = {}

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, CTX)
        self.proj = nn.Linear(CTX, CTX)

    def ids(self, text):
        return [self.vocab.setdefault(w, len(self.vocab) + 2) for w in text.replace(",", " ").split()]

    def tokenize(self, texts):
        return [self.ids(t) for t in texts]

    def tokenize_line(self, line):
        ids = self.ids(line)
        return [types.SimpleNamespace(tokens=[0] + ids + [1] * (76 - len(ids)))], len(ids)

    def encode(self, prompt):
        (chunk,), _ = self.tokenize_line(prompt)
        return self.proj(self.embed(torch.tensor([chunk.tokens])))


def test_class_word_tokens_are_positions_in_the_conditioning():
    clip = _Clip()
    assert a1111.class_word_tokens(clip, "a man and a woman, a man", "man") == [2, 7]
    assert a1111.class_word_tokens(clip, "a man and a woman", "dog") == []


def test_the_xyz_axes_offer_the_settings_choices_and_store_their_values(monkeypatch):
    xyz = types.SimpleNamespace(axis_options=[], AxisOption=lambda label, kind, apply, choices=None: types.SimpleNamespace(
        label=label, kind=kind, apply=apply, choices=choices))
    script = types.SimpleNamespace(script_class=type("Script", (), {"__module__": "xyz_grid.py"}), module=xyz)
    with fake_a1111.installed():
        scripts = types.ModuleType("modules.scripts")
        scripts.scripts_data = [script]
        monkeypatch.setitem(sys.modules, "modules.scripts", scripts)
        monkeypatch.setattr(sys.modules["modules"], "scripts", scripts, raising=False)
        webui_settings.add_xyz_axes()
    axes = {axis.label: axis for axis in xyz.axis_options}
    assert axes["[OMG] Mask split"].choices() == ["figures", "pixels"]
    assert axes["[OMG] Mode"].choices() == ["two passes", "one pass", "fast"] and axes["[OMG] Mask source"].choices()[0] == "attention"
    assert axes["[OMG] Blend start"].choices is None and axes["[OMG] Concept 1 LoRA weight"].choices is None
    p = types.SimpleNamespace()
    axes["[OMG] Mask split"].apply(p, "pixels", None)
    assert p.omg_xyz == {"mask_split": "pixels"}


def test_a_bad_job_fails_with_its_message():
    p = types.SimpleNamespace(sample=None)
    host_api.fail_job(p, "OMG concept 2: class word 'dog' does not appear in the prompt")
    with pytest.raises(a1111.OmgUserError, match="class word 'dog'"):
        p.sample(None, None, [1], [1], 0, ["x"])


def _api_answer(error: Exception) -> tuple[int, bool]:
    """What the WebUIs' API (``modules/api/api.py``, A1111 1.10 and Forge) makes of an exception from a job: the
    exception's own ``status_code`` attribute (500 without one), and a console traceback unless it is FastAPI's
    ``HTTPException``."""
    from fastapi.exceptions import HTTPException

    return vars(error).get("status_code", 500), not isinstance(error, HTTPException)


def test_a_users_mistake_answers_422_with_its_message_and_no_traceback_while_a_fault_stays_500():
    p = types.SimpleNamespace(sample=None)
    host_api.fail_job(p, "OMG mask split must be one of figures, pixels (got 'halves')")
    with pytest.raises(ValueError) as mistake:
        p.sample(None, None, [1], [1], 0, ["x"])
    assert _api_answer(mistake.value) == (422, False)
    assert str(mistake.value) == "OMG mask split must be one of figures, pixels (got 'halves')"  # the UI's text, as before
    assert vars(mistake.value)["detail"] == str(mistake.value)  # the API's JSON "detail"
    with pytest.raises(RuntimeError) as fault:
        row_tracker.RowTracker(images=1).take(torch.zeros(1, 77, 8))
    assert _api_answer(fault.value) == (500, True)


# ---------------------------------------------------------------- a whole job through the stand-in

SCHEDULE = DiscreteSchedule()


class _Model:
    def __init__(self):
        self.model = types.SimpleNamespace(diffusion_model=TinyUNet(context_dim=CTX, seed=0))
        self.cond_stage_model = _Clip()
        torch.manual_seed(0)
        for p in self.cond_stage_model.parameters():
            nn.init.normal_(p, std=0.2)

    def get_learned_conditioning(self, prompts):
        return torch.cat([self.cond_stage_model.encode(p) for p in prompts])


def _recording_textinfo(sample, state, shown):
    """The job's sampling, recording what the progress text says when each sampling run starts."""
    def recording(*args):
        shown.append(state.textinfo)
        return sample(*args)
    return recording


class _Job:
    """Enough of ``StableDiffusionProcessingTxt2Img`` for the adapter, with an A1111-style CFG denoiser."""

    def __init__(self, modules, model, prompt, negative, steps=6, sampler="euler", seeds=(7,), latent=(16, 16)):
        self.modules, self.sd_model = modules, model
        self.prompts = [prompt] * len(seeds) if isinstance(prompt, str) else list(prompt)
        self.all_prompts = list(self.prompts)  # as the host sets them before the scripts' ``process``, LoRA tags and all
        self.negative_prompts = [negative] * len(self.prompts)
        self.height, self.width = latent[0] * 8, latent[1] * 8
        self.seeds, self.subseeds, self.subseed_strength = list(seeds), list(seeds), 0.0
        self.seed_resize_from_h = self.seed_resize_from_w = 0
        self.rng = modules.rng.ImageRNG((4, *latent), self.seeds)
        self.enable_hr, self.extra_generation_params = False, {}
        self.steps, self.sampler_name, self.calls = steps, sampler, 0
        self.extra_network_data = {}

    def cached_params(self, required_prompts, steps, extra_network_data, hires_steps=None, use_old_scheduling=False):
        """The host's key of a prompt's conditioning, with what of it this stand-in has."""
        return (required_prompts, steps, hires_steps, use_old_scheduling, extra_network_data, self.width, self.height)

    def schedule(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent the sampler starts from and the sigmas it walks (txt2img: noise, every step)."""
        sigmas = SCHEDULE.get_sigmas(self.steps)
        return self.rng.next() * sigmas[0], sigmas

    def kept(self, denoised: torch.Tensor) -> torch.Tensor:
        """What the CFG denoiser keeps of a step's denoised latent (img2img's inpainting keeps the init outside)."""
        return denoised

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        unet = self.sd_model.model.diffusion_model
        cond, uncond = conditioning, unconditional_conditioning
        x, sigmas = self.schedule()
        steps = len(sigmas) - 1
        step, state = iter(range(steps)), self.modules.shared.state

        def denoiser(x, sigma):
            # Euler: a denoiser call per step; the host's per-step callback sets the counter after the step's
            # UNet call, so during step i it still says i - 1
            state.sampling_step, state.sampling_steps = max(next(step) - 1, 0), steps
            x_in, sigma_in = torch.cat([x, x]), sigma.repeat(2)
            self.modules.script_callbacks.cfg_denoiser_callback(self.modules.script_callbacks.CFGDenoiserParams(
                x_in, None, sigma_in, state.sampling_step, steps, cond, uncond))
            c_in = 1 / (sigma_in ** 2 + 1) ** 0.5
            eps = unet(x_in * c_in[:, None, None, None], SCHEDULE.sigma_to_t(sigma_in), context=torch.cat([cond, uncond]))
            self.calls += 1
            d, n = x_in - eps * sigma_in[:, None, None, None], x.shape[0]
            denoised = self.kept(d[n:] + (d[:n] - d[n:]) * 7.0)
            self.modules.script_callbacks.cfg_after_cfg_callback(
                self.modules.script_callbacks.AfterCFGCallbackParams(denoised, state.sampling_step, steps))
            return denoised

        return self.kept(SAMPLERS[self.sampler_name](lambda x, s: denoiser(x, s.expand(x.shape[0])), x, sigmas))

    def sample_hr_pass(self, *args, **kwargs):
        raise AssertionError("no hires in this job")


@pytest.fixture(scope="module")
def hero_file(tmp_path_factory):
    """A LoRA file on disk for the WebUI's list entry (OMG checks it before the host's loader runs)."""
    path = tmp_path_factory.mktemp("Lora") / "hero.safetensors"
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(4, 2), "lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, str(path))
    return str(path)


def _networks(model, filename):
    """The built-in Lora extension's ``networks`` module, with one LoRA on a UNet and a text-encoder layer."""
    unet = model.model.diffusion_model
    target = unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k
    net = types.SimpleNamespace(modules={"unet": _LoraModule(target), "te": _LoraModule(model.cond_stage_model.proj)})
    net.modules["te"].te = True
    for m in net.modules.values():
        m.network = net
        nn.init.normal_(m.up_model.weight, std=0.5)
    net.dyn_dim = None
    mod = types.ModuleType("networks")
    mod.available_networks = {"hero": types.SimpleNamespace(filename=filename, shorthash="0123456789ab", read_hash=lambda: None)}
    mod.list_available_networks = lambda: None
    mod.load_network = lambda name, on_disk: net
    return mod, net


@torch.no_grad()
def test_a_whole_job_runs_two_passes_and_leaves_the_model_as_it_was(monkeypatch, hero_file):
    model = _Model()
    unet = model.model.diffusion_model
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    networks, net = _networks(model, hero_file)
    monkeypatch.setitem(sys.modules, "networks", networks)
    cfg = OmgConfig(enabled=True, blend_start=0.5, mask_dilation=0, mask_feather=0, concepts=[
        ConceptSpec(lora="hero", class_word="man", prompt="a man, red cape"),
        ConceptSpec(class_word="woman", prompt="a woman, blue dress"),
    ])
    with fake_a1111.installed() as modules:
        job = _Job(modules, model, "a man and a woman", "blurry")
        plain = job.sample(model.get_learned_conditioning(["a man and a woman"]), model.get_learned_conditioning(["blurry"]), [7], [7], 0, job.prompts)
        job.rng = modules.rng.ImageRNG((4, 16, 16), job.seeds)
        generation = a1111.A1111Generation(job, cfg)
        c, uc = model.get_learned_conditioning(["a man and a woman"]), model.get_learned_conditioning(["blurry"])
        jobs_before = (modules.shared.state.job_count, modules.shared.state.job_no)
        modules.shared.total_tqdm._tqdm = bar = types.SimpleNamespace(total=6, refresh=lambda: None)  # as after a hires init
        shown = []
        job.sample = _recording_textinfo(job.sample, modules.shared.state, shown)
        generation.attach()  # the recording sample inside OMG's
        final = job.sample(c, uc, [7], [7], 0, job.prompts)
        assert not modules.script_callbacks.callback_map["callbacks_cfg_denoiser"]
        # the progress bar counts pass 1 as a job of its own, the console's total bar its steps; each pass says what it is
        assert (modules.shared.state.job_count, modules.shared.state.job_no) == (jobs_before[0] + 1, jobs_before[1] + 1)
        assert bar.total == 6 + 6
        assert shown == ["OMG pass 1 of 2: layout", "OMG pass 2 of 2: concepts"]
    assert job.calls == 6 + 6 + 6  # the plain run, pass 1, pass 2 (the denoiser runs; replays cost no UNet)
    assert generation.layout_images == []  # shown once the host has decoded the batch
    generation.keep_pictures(torch.rand(1, 3, 96, 128))
    assert [[suffix for _, suffix in pictures] for pictures in generation.layout_images] == [["-omg-masks"]]
    assert generation.layout_images[0][0][0].size == (128, 96)
    assert job.extra_generation_params["OMG c1 lora"] == "hero"
    assert job.extra_generation_params["OMG c1 lora hash"] == "0123456789ab" and "OMG c2 lora hash" not in job.extra_generation_params
    assert not torch.equal(final, plain)
    assert "forward" not in unet.__dict__ and not any(m._forward_hooks for m in unet.modules())
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in before.items())
    # the concept's text-encoder LoRA reached its conditioning
    concept = generation.prepared.concepts[0]
    te_lora = loras.module_delta(net.modules["te"], 1.0)
    lora_clip = merged(model.cond_stage_model, {"proj": te_lora})
    torch.testing.assert_close(concept.cond["context"], lora_clip.encode("a man, red cape"), rtol=1e-5, atol=1e-5)
    assert list(concept.deltas) == ["input_blocks.1.1.transformer_blocks.0.attn2.to_k"]


@torch.no_grad()
@pytest.mark.parametrize("mode, blended_by", [("fast", "_fast"), ("one pass", "_blended")])
def test_a_fast_job_runs_one_pass_and_leaves_the_model_as_it_was(monkeypatch, two_concepts, mode, blended_by):
    """Fast mode blends in the host's rows, the one-pass mode in concept rows (``_blended``, as pass 2 does)."""
    model, cfg = two_concepts
    cfg.mode = mode
    unet = model.model.diffusion_model
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with fake_a1111.installed() as modules:
        job = _Job(modules, model, "a man and a woman", "blurry", latent=(12, 20))
        c, uc = model.get_learned_conditioning(["a man and a woman"]), model.get_learned_conditioning(["blurry"])
        plain = job.sample(c, uc, [7], [7], 0, job.prompts)
        job.rng = modules.rng.ImageRNG((4, 12, 20), job.seeds)
        generation = a1111.A1111Generation(job, cfg)
        generation.attach()
        seen = []
        engine_call = getattr(a1111.OmgSession, blended_by)
        monkeypatch.setattr(a1111.OmgSession, blended_by, lambda self, *a: seen.append(self.masks) or engine_call(self, *a))
        monkeypatch.setattr(modules.sd_samplers_common, "sample_to_image", lambda *a, **k: pytest.fail("fast mode decoded an image"))
        final = job.sample(c, uc, [7], [7], 0, job.prompts)
        assert not modules.script_callbacks.callback_map["callbacks_cfg_denoiser"]
    assert job.calls == 6 + 6  # the plain run and the one pass
    assert len(seen) == 3  # steps 3, 4, 5 of 6 blend (blend start 0.5)
    assert tuple(seen[0].masks.shape) == (1, 2, 12, 20)
    assert generation.session is None and job.extra_generation_params["OMG mode"] == mode
    generation.keep_pictures(torch.rand(1, 3, 96, 160))
    assert [[suffix for _, suffix in pictures] for pictures in generation.layout_images] == [["-omg-masks"]]
    assert not torch.equal(final, plain)
    assert "forward" not in unet.__dict__ and not any(m._forward_hooks for m in unet.modules())
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in before.items())


@torch.no_grad()
@pytest.mark.parametrize("blend_start, blended", [(0.17, 5), (0.5, 3), (0.75, 1), (0.8, 1)])
def test_fast_mode_blends_from_the_blend_starts_step_though_the_hosts_counter_lags(monkeypatch, two_concepts, blend_start, blended):
    """Of 6 steps, blend start 0.17 → steps 1–5 blend, 0.5 → 3–5, 0.75 and 0.8 → 5: the host's
    counter says 0 in steps 0 and 1, yet step 0 (the only one whose attention the masks can come
    from at 0.17) runs plain, and no step is lost to the lag. 0.75 × 6 = 4.5 rounds half up to
    step 5 as two passes' threshold does (Python's round would say 4 and blend a step early)."""
    model, cfg = two_concepts
    cfg.mode, cfg.blend_start = "fast", blend_start
    seen = []
    engine_fast = a1111.OmgSession._fast
    monkeypatch.setattr(a1111.OmgSession, "_fast", lambda self, *a: seen.append(1) or engine_fast(self, *a))
    with fake_a1111.installed() as modules:
        job = _Job(modules, model, "a man and a woman", "blurry", latent=(12, 20))
        a1111.A1111Generation(job, cfg).attach()
        job.sample(model.get_learned_conditioning(["a man and a woman"]), model.get_learned_conditioning(["blurry"]), [7], [7], 0,
                   job.prompts)
    assert len(seen) == blended
    assert "OMG warnings" not in job.extra_generation_params


@torch.no_grad()
@pytest.mark.parametrize("blend_start", [0.95, 1.0])
def test_a_fast_job_whose_sampler_never_reaches_the_blend_start_says_so(two_concepts, blend_start):
    """A blend start past the last step a sampler counts (here round(0.95 × 6) = 6 of steps 0–5;
    "DPM fast" counts a third of them) leaves no step for the concepts: the image is the plain
    one, and the infotext says why instead of passing it off as OMG's."""
    model, cfg = two_concepts
    cfg.mode, cfg.blend_start = "fast", blend_start
    with fake_a1111.installed() as modules:
        job = _Job(modules, model, "a man and a woman", "blurry", latent=(12, 20))
        c, uc = model.get_learned_conditioning(["a man and a woman"]), model.get_learned_conditioning(["blurry"])
        plain = job.sample(c, uc, [7], [7], 0, job.prompts)
        job.rng = modules.rng.ImageRNG((4, 12, 20), job.seeds)
        a1111.A1111Generation(job, cfg).attach()
        final = job.sample(c, uc, [7], [7], 0, job.prompts)
    assert torch.allclose(final, plain, atol=1e-5)
    assert job.extra_generation_params["OMG warnings"] == (
        "OMG fast mode never reached its blend start (step 6 of 6; sampler 'euler' counted to step 5): the image was made "
        "without the concepts; lower the blend start, or use another sampler or two passes")


def test_lora_for_another_architecture_is_named_and_text_encoder_deltas_reach_attention(monkeypatch, hero_file):
    unet_layer, attention = nn.Linear(8, 6), nn.MultiheadAttention(8, 2)
    wrong = _LoraModule(unet_layer)
    wrong.down_model = nn.Linear(5, 2, bias=False)  # an SD1.5 LoRA's 768-wide factor on an SDXL 2048-wide layer
    net = types.SimpleNamespace(modules={"unet_layer": wrong}, te_multiplier=0.5, unet_multiplier=1.0, dyn_dim=None)
    wrong.network = net
    networks = types.ModuleType("networks")
    networks.available_networks, networks.load_network = {"hero": types.SimpleNamespace(filename=hero_file)}, lambda name, on_disk: net
    networks.list_available_networks = lambda: None
    monkeypatch.setitem(sys.modules, "networks", networks)
    unet_modules, te_modules = {id(unet_layer): ("layer", unet_layer)}, {id(attention): ("attn", attention)}
    with pytest.raises(a1111.OmgUserError, match="LoRA 'hero' does not fit this checkpoint .*factors give 6x5, the layer is \\(6, 8\\)"):
        loras.load_concept_lora("hero", 1.0, 0.5, unet_modules, te_modules)
    # SDXL's OpenCLIP-G: a k_proj LoRA on a MultiheadAttention lands in the k rows of in_proj_weight
    k_lora = _LoraModule(nn.Linear(8, 8))
    k_lora.sd_module, k_lora.te, k_lora.network = attention, True, net
    net.modules = {"unet_layer": _LoraModule(unet_layer), "te_attn_k_proj": k_lora}
    net.modules["unet_layer"].network = net
    unet, te = loras.load_concept_lora("hero", 1.0, 0.5, unet_modules, te_modules)
    assert list(unet) == ["layer"] and len(te) == 1 and te[0][0] is attention.in_proj_weight
    before = attention.in_proj_weight.detach().clone()
    expected = k_lora.up_model.weight @ k_lora.down_model.weight * k_lora.calc_scale() * 0.5
    with pytest.raises(RuntimeError, match="boom"):
        with loras.merged(te):
            changed = attention.in_proj_weight.detach() - before
            torch.testing.assert_close(changed[8:16], expected)
            assert changed[:8].abs().max() == 0 and changed[16:].abs().max() == 0
            raise RuntimeError("boom")
    assert torch.equal(attention.in_proj_weight, before)  # restored exactly, also after an error
    with pytest.raises(a1111.OmgUserError, match="LoRA 'nope' is not in the WebUI's LoRA list"):
        loras.load_concept_lora("nope", 1.0, 1.0, unet_modules, te_modules)



def test_a_lora_whose_layers_mostly_miss_this_checkpoint_is_named(monkeypatch, tmp_path):
    """The host's parser matched 2 of the file's 5 layers (an SD1.5 LoRA on SDXL shares a few names and shapes)."""
    path = tmp_path / "hero.safetensors"
    save_file({f"lora_unet_l{i}.{part}.weight": torch.zeros(2, 2) for i in range(5) for part in ("lora_up", "lora_down")}, str(path))
    layer, other = nn.Linear(8, 6), nn.Linear(8, 6)
    net = types.SimpleNamespace(modules={"l0": _LoraModule(layer), "l1": _LoraModule(other)}, te_multiplier=1.0, unet_multiplier=1.0)
    networks = types.ModuleType("networks")
    networks.available_networks, networks.load_network = {"hero": types.SimpleNamespace(filename=str(path))}, lambda name, on_disk: net
    networks.list_available_networks = lambda: None
    monkeypatch.setitem(sys.modules, "networks", networks)
    modules = {id(layer): ("layer", layer), id(other): ("other", other)}
    with pytest.raises(a1111.OmgUserError, match=r"^OMG: LoRA 'hero' fits only 2 of its 5 layers to this checkpoint "
                                                 r"\(made for another architecture\?\)$"):
        loras.load_concept_lora("hero", 1.0, 1.0, modules, {})
    net.modules["l2"] = _LoraModule(third := nn.Linear(8, 6))
    unet, _ = loras.load_concept_lora("hero", 1.0, 1.0, {**modules, id(third): ("third", third)}, {})
    assert sorted(unet) == ["layer", "other", "third"]  # 3 of 5: more than half, used

@pytest.fixture
def two_concepts(monkeypatch, hero_file):
    """(model, settings): the stand-in model with the WebUI's LoRA list installed, and two concepts
    (a man with the hero LoRA, a woman without one); pass 2 with host rows (``background="redrawn"``), whose rows
    these tests count."""
    model = _Model()
    networks, _ = _networks(model, hero_file)
    monkeypatch.setitem(sys.modules, "networks", networks)
    return model, OmgConfig(enabled=True, blend_start=0.5, mask_dilation=0, mask_feather=0, background="redrawn", concepts=[
        ConceptSpec(lora="hero", class_word="man", prompt="a man, red cape"),
        ConceptSpec(class_word="woman", prompt="a woman, blue dress"),
    ])


def _run_job(modules, model, cfg, prompts, seeds, latent, scripts=None, marked=False, negative="blurry", extra_networks=None):
    """One txt2img job through the adapter; the session it ran with (its job's infotext as ``session.infotext``,
    the adapter as ``session.generation``).
    ``scripts``: (the job's always-on scripts, their arguments); ``marked``: the prompts' conditioning carries
    sd-webui-controlnet's leading mark token (+1024 cond, -1024 uncond); ``extra_networks``: the job's
    ``extra_network_data`` (the global prompt's own LoRAs)."""
    sessions = []

    class RecordedSession(a1111.OmgSession):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sessions.append(self)

    job = _Job(modules, model, prompts, negative, seeds=seeds, latent=latent)
    job.extra_network_data = extra_networks or {}
    if scripts is not None:
        job.scripts, job.script_args = types.SimpleNamespace(alwayson_scripts=scripts[0]), scripts[1]
    generation = a1111.A1111Generation(job, cfg)
    generation.attach()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(a1111, "OmgSession", RecordedSession)
        c, uc = model.get_learned_conditioning(job.prompts), model.get_learned_conditioning(job.negative_prompts)
        if marked:
            c, uc = (torch.cat([torch.full_like(x[:, :1], sign * 1024.0), x], dim=1) for x, sign in ((c, 1), (uc, -1)))
        final = job.sample(c, uc, job.seeds, job.seeds, 0, job.prompts)
    sessions[0].infotext, sessions[0].generation = job.extra_generation_params, generation
    return final, sessions[0]


@torch.no_grad()
def test_a_concepts_lora_also_in_the_main_prompt_is_named_in_the_warnings(two_concepts):
    model, cfg = two_concepts
    with fake_a1111.installed() as modules:
        _, session = _run_job(modules, model, cfg, ["a man and a woman <lora:Hero:0.8>", "a man and a woman"], [7, 8], (12, 16))
        assert "OMG concept 1's LoRA 'hero' is also in the prompt" in session.infotext["OMG warnings"]
        _, session = _run_job(modules, model, cfg, ["a man and a woman <lora:heroine:1>"], [7], (12, 16))
        assert "OMG warnings" not in session.infotext  # another LoRA (a style) in the prompt is the user's to apply


@torch.no_grad()
def test_the_next_job_reuses_its_concepts_while_nothing_they_depend_on_changes(monkeypatch, two_concepts, hero_file):
    model, cfg = two_concepts
    networks, loads, encodes = sys.modules["networks"], [], []
    load, encode = networks.load_network, model.get_learned_conditioning
    monkeypatch.setattr(networks, "load_network", lambda name, on_disk: loads.append(name) or load(name, on_disk))
    monkeypatch.setattr(model, "get_learned_conditioning", lambda texts: encodes.append(str(texts[0])) or encode(texts))

    def job(**kwargs):
        loads.clear()
        final, _ = _run_job(modules, model, cfg, ["a man and a woman"], [7], (12, 16), **kwargs)
        concept_encodes = [e for e in encodes if e not in ("a man and a woman", kwargs.get("negative", "blurry"))]
        encodes.clear()
        return final, len(loads), len(concept_encodes)

    with fake_a1111.installed() as modules:
        first, *loaded = job()
        assert loaded == [1, 2]  # one LoRA file, each concept's prompt (its negative prompt is the global one)
        again, *loaded = job()
        assert loaded == [0, 0] and torch.equal(again, first)
        cfg.concepts[0].te_weight = 0.5
        assert job()[1:] == (1, 1)  # the hero concept alone: its LoRA at a new weight, its prompt encoded again
        os.utime(hero_file, ns=(os.stat(hero_file).st_atime_ns, os.stat(hero_file).st_mtime_ns + 10 ** 9))
        assert job()[1:] == (1, 1)  # the file changed on disk
        assert job(extra_networks={"lora": ["other"]})[1:] == (1, 2)  # the global prompt's own LoRAs reach the encoder
        assert job(extra_networks={"lora": ["other"]})[1:] == (0, 0)
        assert job(negative="ugly")[1:] == (1, 2)  # a concept's negative prompt is the job's: both encoded again


@torch.no_grad()
def test_concepts_are_kept_only_from_the_last_job_and_only_as_low_rank_loras(monkeypatch, two_concepts):
    model, cfg = two_concepts
    with fake_a1111.installed() as modules:
        _run_job(modules, model, cfg, ["a man and a woman"], [7], (12, 16))
        assert [type(d) for _, (deltas, _, _) in CONCEPTS.entries for d in deltas.values()] == [LowRankDelta]
        assert len(CONCEPTS.entries) == 2
        cfg.concepts = cfg.concepts[1:]
        _run_job(modules, model, cfg, ["a woman"], [7], (12, 16))
        assert len(CONCEPTS.entries) == 1 and CONCEPTS.entries[0][0][2] == ""  # the woman's, without a LoRA
        hero = sys.modules["networks"].load_network("hero", None).modules["unet"]
        monkeypatch.setattr(hero, "dora_scale", torch.ones(1))  # DoRA: a dense delta, as large as its layers
        cfg.concepts = [ConceptSpec(lora="hero", class_word="man", prompt="a man, red cape")]
        _run_job(modules, model, cfg, ["a man"], [7], (12, 16))
        assert CONCEPTS.entries == []


@torch.no_grad()
def test_the_layout_is_decoded_only_when_shown_or_for_an_image_mask_source(monkeypatch, two_concepts):
    """The masks are drawn over the images the host decodes; pass 1's layout costs a VAE decode of OMG's own only
    when "show layout" asks for it or the mask source looks at it (SAM, a detector). The image is the same."""
    model, cfg = two_concepts
    decoded = []

    def shown(session) -> list:
        session.generation.keep_pictures(torch.rand(1, 3, 96, 128))
        return [[suffix for _, suffix in pictures] for pictures in session.generation.layout_images]

    with fake_a1111.installed() as modules:
        to_image = modules.sd_samplers_common.sample_to_image
        monkeypatch.setattr(modules.sd_samplers_common, "sample_to_image", lambda *a, **k: decoded.append(1) or to_image(*a, **k))
        default, session = _run_job(modules, model, cfg, ["a man and a woman"], [7], (12, 16))
        assert len(decoded) == 0 and shown(session) == [["-omg-masks"]]
        cfg.show_layout = True
        with_layout, session = _run_job(modules, model, cfg, ["a man and a woman"], [7], (12, 16))
        assert len(decoded) == 1 and shown(session) == [["-omg-layout", "-omg-masks"]] and torch.equal(with_layout, default)
        cfg.show_masks = False
        _, session = _run_job(modules, model, cfg, ["a man and a woman"], [7], (12, 16))
        assert len(decoded) == 2 and shown(session) == [["-omg-layout"]]
        cfg.show_layout = False
        hidden, session = _run_job(modules, model, cfg, ["a man and a woman"], [7], (12, 16))
        assert len(decoded) == 2 and shown(session) == [] and torch.equal(hidden, default)
        cfg.mask_source = "regions"
        cfg.regions = json.dumps({"width": 128, "height": 96, "boxes": {"1": [0, 0, 64, 96], "2": [64, 0, 128, 96]}})
        _run_job(modules, model, cfg, ["a man and a woman"], [7], (12, 16))
        assert len(decoded) == 2
        cfg.mask_source = "attention+sam"
        monkeypatch.setattr(a1111, "concept_masks", lambda source, inputs, models: types.SimpleNamespace(
            masks=torch.zeros(2, 12, 16), empty=[], sources=[source], warnings=lambda: []))
        _run_job(modules, model, cfg, ["a man and a woman"], [7], (12, 16))
        assert len(decoded) == 3  # SAM looks at the layout image


@torch.no_grad()
@pytest.mark.parametrize("mode", ["two passes", "fast"])
def test_nan_from_the_model_stops_the_job_with_what_to_do_and_leaves_the_model_as_it_was(monkeypatch, two_concepts, mode):
    """An overflowing checkpoint or LoRA (half precision, a strong text-encoder LoRA) makes NaN
    conditioning: the rows are still followed, and the job stops where the masks are made,
    saying what happened, instead of "lost track of the UNet rows" or the mask engine's words."""
    model, cfg = two_concepts
    cfg.mode = mode
    unet = model.model.diffusion_model
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    encode = model.get_learned_conditioning
    monkeypatch.setattr(model, "get_learned_conditioning", lambda prompts: torch.full_like(encode(prompts), float("nan")))
    with fake_a1111.installed() as modules:
        with pytest.raises(a1111.OmgUserError, match=r"NaN \(not-a-number\) values before the masks were made.*--no-half"):
            _run_job(modules, model, cfg, ["a man and a woman"], [7], (12, 16))
        assert not any(modules.script_callbacks.callback_map.values())
    assert "forward" not in unet.__dict__ and not any(m._forward_hooks for m in unet.modules())
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in before.items())


@torch.no_grad()
def test_shared_concept_guidance_runs_no_concept_uncond_rows(two_concepts):
    model, cfg = two_concepts
    cfg.concept_guidance = "own"
    with fake_a1111.installed() as modules:
        own, own_session = _run_job(modules, model, cfg, ["a man and a woman"], [7], (12, 16))
        cfg.concept_guidance = "shared"
        shared, session = _run_job(modules, model, cfg, ["a man and a woman"], [7], (12, 16))
    calls = session.counters["pass2"].calls
    assert calls == own_session.counters["pass2"].calls == 3  # steps 3..5 of 6 blend
    assert (own_session.counters["pass2"].rows, session.counters["pass2"].rows) == (calls * 6, calls * 4)
    assert session.infotext["OMG concept guidance"] == "shared" and not torch.equal(own, shared)


@torch.no_grad()
def test_a_job_inside_a1111s_autocast_runs_in_half_precision_and_stays_close(two_concepts):
    """A1111 on CUDA samples inside ``devices.autocast()`` = ``torch.autocast("cuda")`` (fp16): layers take
    float32 from a GroupNorm and return half. CPU autocast in fp16 stands in for it here."""
    model, cfg = two_concepts
    prompts = ["a man and a woman"] * 2
    with fake_a1111.installed() as modules:
        full, _ = _run_job(modules, model, cfg, prompts, [7, 8], (12, 16))
        with torch.autocast("cpu", dtype=torch.float16):
            half, session = _run_job(modules, model, cfg, prompts, [7, 8], (12, 16))
    assert torch.isfinite(half).all() and session.attention_maps().dtype == torch.float32
    assert float((half - full).norm() / full.norm()) < 0.02


@torch.no_grad()
def test_the_keep_attention_setting_off_runs_a_reference_row_per_image_for_the_same_image(two_concepts):
    model, cfg = two_concepts
    prompts = ["a man and a woman", "on grass a woman hugs a tall man"]
    with fake_a1111.installed() as modules:
        kept, session = _run_job(modules, model, cfg, prompts, [7, 8], (12, 16))
        modules.shared.opts.data[webui_settings.KEEP_ATTENTION_OPTION] = False
        try:
            reference, ref_session = _run_job(modules, model, cfg, prompts, [7, 8], (12, 16))
        finally:
            del modules.shared.opts.data[webui_settings.KEEP_ATTENTION_OPTION]
    calls = session.counters["pass2"].calls
    assert calls == ref_session.counters["pass2"].calls > 0
    assert (session.counters["pass2"].rows, ref_session.counters["pass2"].rows) == (calls * 8, calls * 10)
    assert all(c.layout is None for c in ref_session.record.calls)
    torch.testing.assert_close(kept, reference, rtol=1e-3, atol=1e-3)


@torch.no_grad()
def test_the_memory_setting_caps_pass2_calls_and_the_image_stays_the_same(two_concepts):
    model, cfg = two_concepts
    prompts = ["a man and a woman"] * 2
    with fake_a1111.installed() as modules:
        whole, free = _run_job(modules, model, cfg, prompts, [7, 8], (12, 16))
        assert free.memory.budget_bytes is None and free.row_limit.rows is None  # on a CPU: no limit, nothing measured
        modules.shared.opts.data[webui_settings.MEMORY_OPTION] = 2
        try:
            cut, capped = _run_job(modules, model, cfg, prompts, [7, 8], (12, 16))
        finally:
            del modules.shared.opts.data[webui_settings.MEMORY_OPTION]
    assert capped.memory.budget_bytes == 2 << 20
    assert capped.row_limit.budget == max(int((2 << 20) * 0.8) // capped.memory.row_bytes((12, 16)), 2) < 14
    torch.testing.assert_close(cut, whole, rtol=1e-3, atol=1e-3)


@torch.no_grad()
def test_the_mask_split_setting_decides_which_concepts_masks_are_split_into_figures(monkeypatch, two_concepts):
    """"figures" (the default): a man and a woman are split as figures; "pixels": only same-word concepts are."""
    model, cfg = two_concepts
    seen, real = [], a1111.concept_masks
    monkeypatch.setattr(a1111, "concept_masks", lambda source, inputs, models=None: seen.append(inputs.groups) or
                        real(source, inputs, models))
    with fake_a1111.installed() as modules:
        for split in ("figures", "pixels"):
            cfg.mask_split = split
            _, session = _run_job(modules, model, cfg, ["a man and a woman"], [7], (12, 20))
            assert session.infotext["OMG mask split"] == split
    assert seen == [[[0, 1]], []]


@torch.no_grad()
@pytest.mark.parametrize("latent", [(12, 16), (16, 10)])
def test_each_image_of_a_batch_is_made_from_its_own_prompt_and_orientation(latent, two_concepts):
    """A batch whose prompts differ (wildcards): each image is the image it would be alone."""
    model, cfg = two_concepts
    prompts = ["a man and a woman", "on grass a woman hugs a tall man"]
    with fake_a1111.installed() as modules:
        batch, session = _run_job(modules, model, cfg, prompts, [7, 8], latent)
        assert session.maps.tokens == [[[2], [5]], [[8], [4]]]
        assert batch.shape == (2, 4, *latent)
        for i in range(2):
            alone, _ = _run_job(modules, model, cfg, prompts[i:i + 1], [7 + i], latent)
            torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-3, atol=1e-3)  # float noise of a batch ~1e-4
        # an image whose prompt lacks a class word: that concept is skipped there, the rest is made
        prompts = ["a man and a woman", "a tall man"]
        batch, session = _run_job(modules, model, cfg, prompts, [7, 8], latent)
        alone, _ = _run_job(modules, model, cfg, prompts[:1], [7], latent)
    torch.testing.assert_close(batch[:1], alone, rtol=1e-3, atol=1e-3)
    masks = session.masks.masks
    assert session.maps.tokens[1][1] == [] and masks[1, 1].sum() == 0 and masks[1, 0].sum() > 0 and masks[0, 1].sum() > 0
    assert session.infotext["OMG warnings"] == (
        "OMG concept 2 skipped: class word 'woman' does not appear in the prompt of image 2 of the batch ('a tall man')")


@torch.no_grad()
def test_fast_mode_hands_sam_the_image_of_the_denoised_latent_before_the_blend_start(monkeypatch, two_concepts):
    from omg_ext.masks.segment import segment
    from omg_ext.masks.sources import MaskModels
    from minisd.mask_models import tiny_sam

    model, cfg = two_concepts
    # per-pixel cores: the random tiny SAM's masks agree with them for both concepts, so both use SAM
    cfg.mode, cfg.mask_source, cfg.mask_split = "fast", "attention+sam", "pixels"
    sam, seen, denoised = tiny_sam(), [], []
    monkeypatch.setattr(a1111, "mask_models", lambda cfg: MaskModels(
        sam=lambda: lambda image, prompts: seen.append(image) or segment(sam, image, prompts)))
    with fake_a1111.installed() as modules:
        modules.script_callbacks.on_cfg_after_cfg(lambda params: denoised.append(params.x.clone()))
        job = _Job(modules, model, "a man and a woman", "blurry", latent=(12, 20))
        generation = a1111.A1111Generation(job, cfg)
        generation.attach()
        c, uc = model.get_learned_conditioning(["a man and a woman"]), model.get_learned_conditioning(["blurry"])
        job.sample(c, uc, [7], [7], 0, job.prompts)
        assert len(modules.script_callbacks.callback_map["callbacks_cfg_after_cfg"]) == 1  # only the test's own is left
    assert len(seen) == 1 and len(denoised) == 6
    # blending starts at step 3 of 6: SAM saw what step 2's denoised latent decodes to
    expected = numpy.array(modules.sd_samplers_common.sample_to_image(denoised[2], 0))
    assert numpy.array_equal(seen[0], expected)
    assert job.extra_generation_params["OMG mask sources used"] == "attention+sam, attention+sam"


def test_pictures_come_from_latents_or_from_the_decoded_images_a_hires_job_returns():
    class DecodedSamples(list):  # A1111's / Forge's ``processing.DecodedSamples``
        already_decoded = True

    with fake_a1111.installed():
        decoded = pictures.to_pictures(DecodedSamples([torch.zeros(3, 8, 12), torch.ones(3, 8, 12)]))
        latents = pictures.to_pictures(torch.zeros(2, 4, 8, 12))
    assert [p.size for p in decoded] == [(12, 8)] * 2 and decoded[0].getpixel((0, 0)) == (128, 128, 128)
    assert decoded[1].getpixel((0, 0)) == (255, 255, 255) and len(latents) == 2


def test_a_callback_is_named_only_where_the_host_takes_a_name():
    """Forge Classic keeps A1111's older ``on_cfg_after_cfg(callback)``; A1111 1.10, Forge and reForge take a name."""
    registered = []

    def older(callback):
        registered.append((callback, None))

    def newer(callback, *, name=None):
        registered.append((callback, name))

    host_api.add_callback(older, print, "omg")
    host_api.add_callback(newer, print, "omg")
    assert registered == [(print, None), (print, "omg")]


class _ControlModel(nn.Module):
    """A unit's control model: one residual per row, of its own size."""

    def __init__(self, size: float) -> None:
        super().__init__()
        self.size = size

    def forward(self, x, hint=None, timesteps=None, context=None, y=None, **kwargs):
        return [torch.full_like(x, self.size)]


class _IpAdapter:
    """sd-webui-controlnet's ``PlugableIPAdapter`` in brief: a cond and an uncond image embedding (4 tokens); at each
    ``attn2``, keys and values projected from the embedding of each row's mark, cached per layer on first use (for
    the rows of that call, as the real one does), and their attention added to the module's output by a function in
    its ``ipadapter_hacks`` (the module's forward replaced by one that calls them). ``calls``: per function call,
    (rows, rows of the cached keys)."""

    def __init__(self, unet, marks: list, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.embedding, self.marks, self.cache, self.calls = torch.randn(2, 4, CTX, generator=g), marks, {}, []
        self.projections = {}
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                inner = module.to_k.out_features
                self.projections[name] = [torch.randn(CTX, inner, generator=g) * 0.2 for _ in "kv"]
                if not hasattr(module, "ipadapter_hacks"):
                    module.ipadapter_hacks, module.reached = [], []
                    module.forward = types.MethodType(_ip_hacked_forward, module)
                module.ipadapter_hacks.append(self.term(name))

    def term(self, name):
        @torch.no_grad()
        def forward(attn, x, q):
            if name not in self.cache:
                embedding = self.embedding[[0 if mark else 1 for mark in self.marks[-1]]]
                self.cache[name] = [embedding @ w for w in self.projections[name]]
            k, v = self.cache[name]
            self.calls.append((x.shape[0], k.shape[0]))
            rows, heads, _, d = q.shape
            k, v = (t.view(rows, -1, heads, d).transpose(1, 2) for t in (k, v))
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(rows, -1, heads * d)
        return forward


def _ip_hacked_forward(self, x, context=None, mask=None, **kwargs):
    """sd-webui-controlnet's ``attn_forward_hacked``: the attention, plus each ``ipadapter_hacks`` term; records
    which rows got a term."""
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    rows, n, c = q.shape
    q, k, v = (t.view(rows, -1, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2).reshape(rows, n, c)
    added = sum(term(self, x, q) for term in self.ipadapter_hacks)
    self.reached.append((added.flatten(1).abs().sum(1) > 0).tolist())
    return self.to_out(out + added)


def _with_sd_webui_controlnet(model, kinds):
    """sd-webui-controlnet in brief: one ``ControlParams`` per enabled unit (``kinds``: each unit's model type), and
    its UNet forward taking each row's cond/uncond mark off its context and adding every ControlNet unit's
    residuals, computed on the rows it is given, to the UNet's output (IP-Adapter units: ``_IpAdapter``). Returns
    (scripts, the units' params, per call: (rows, [per ControlNet unit: which rows got a residual], each row's mark))."""
    unet, seen, marks_now = model.model.diffusion_model, [], []
    params = [types.SimpleNamespace(control_model=_IpAdapter(unet, marks_now, i) if kind == "IPAdapter" else
                                    _ControlModel(0.05 * (i + 1)),
                                    control_model_type=types.SimpleNamespace(name=kind, is_controlnet=kind == "ControlNet"))
              for i, kind in enumerate(kinds)]

    def forward(x, timesteps=None, context=None, y=None, **kwargs):
        marks = [1] * x.shape[0]  # unmarked rows are taken for cond rows
        if bool(torch.all((context[:, 0].abs() - 1024).abs() < 1e-3)):
            marks, context = (context[:, 0, 0] > 0).int().tolist(), context[:, 1:]
        marks_now.append(marks)
        out, reached = type(unet).forward(unet, x, timesteps, context=context), []
        for param in params:
            if param.control_model_type.is_controlnet:
                residual = param.control_model(x=x, hint=None, timesteps=timesteps, context=context)[0]
                reached.append((residual.flatten(1).abs().sum(1) > 0).tolist())
                out = out + residual
        seen.append((x.shape[0], reached, marks))
        return out

    unet.forward = forward
    script = types.SimpleNamespace(title=lambda: "ControlNet", args_from=1, args_to=1 + len(kinds),
                                   latest_network=types.SimpleNamespace(control_params=params))
    return ([script], [None] + [{"enabled": True}] * len(kinds)), params, seen


@torch.no_grad()
def test_a_concepts_own_controlnet_unit_acts_on_its_rows_only_and_the_units_come_back(two_concepts):
    """With sd-webui-controlnet, unit 1 given to the woman reaches only her rows (none in pass 1), unit 0 every
    row; after the job each unit has its own control model again."""
    model, cfg = two_concepts
    cfg.concepts[1].control_unit = 1
    with fake_a1111.installed() as modules:
        scripts, params, seen = _with_sd_webui_controlnet(model, ["ControlNet", "ControlNet"])
        models = [param.control_model for param in params]
        own, session = _run_job(modules, model, cfg, ["a man and a woman"], [7], (12, 16), scripts)
        assert [param.control_model for param in params] == models
        assert not any(a1111.CONCEPT_KEY in cond for _, (_, cond, _) in CONCEPTS.entries)  # kept as loaded
        pass1, pass2 = seen[:6], seen[6:]
        assert all(reached == [[True, True], [False, False]] for _, reached, _ in pass1)
        # pass 2 from the blend start: host cond, host uncond, the man's row, the woman's row
        assert [reached for rows, reached, _ in pass2 if rows == 4] == [[[True] * 4, [False, False, False, True]]] * 3
        cfg.concepts[1].control_unit = -1
        everywhere, _ = _run_job(modules, model, cfg, ["a man and a woman"], [7], (12, 16), scripts)
    assert session.infotext["OMG c2 control unit"] == 1 and not torch.equal(own, everywhere)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["two passes", "reference rows", "fast"])
def test_an_ip_adapter_unit_acts_in_every_call_of_either_mode_with_keys_made_for_that_calls_rows(two_concepts, mode, monkeypatch):
    """sd-webui-controlnet's IP-Adapter term reaches every cross-attention of every UNet call, also where OMG
    computes the attention itself (reference rows' replaced attention, fast mode's cross-attention), each time from
    keys made for that call's rows (its cache holds the first call's: 2 rows, where pass 2 has 4 or 5)."""
    model, cfg = two_concepts
    cfg.mode = "fast" if mode == "fast" else "two passes"
    with fake_a1111.installed() as modules:
        monkeypatch.setitem(modules.shared.opts.data, webui_settings.KEEP_ATTENTION_OPTION, mode != "reference rows")
        scripts, params, seen = _with_sd_webui_controlnet(model, ["IPAdapter"])
        with_ip, session = _run_job(modules, model, cfg, ["a man and a woman"], [7], (12, 16), scripts, marked=True)
        ip, unet_calls = params[0].control_model, len(seen)
        for module in model.model.diffusion_model.modules():
            if module.__dict__.pop("forward", None) is not None:  # the IP-Adapter unhooked: its term gone
                module.ipadapter_hacks = []
        without, _ = _run_job(modules, model, cfg, ["a man and a woman"], [7], (12, 16), scripts, marked=True)
    # pass 1: 6 calls, pass 2: the 3 steps from the blend start (fast mode: one pass of 6)
    assert unet_calls == (6 if mode == "fast" else 9) and len(ip.calls) == len(ip.projections) * unet_calls
    assert all(rows == cached for rows, cached in ip.calls), sorted(set(ip.calls))
    assert {rows for rows, _ in ip.calls} == {"two passes": {2, 4}, "reference rows": {2, 5}, "fast": {2}}[mode]
    assert not torch.allclose(with_ip, without)


@torch.no_grad()
def test_a_concepts_own_ip_adapter_unit_acts_on_its_rows_only_and_its_functions_come_back(two_concepts):
    """An IP-Adapter unit given to the woman: its term only on her rows in pass 2, on no row in pass 1; unit 0 (another
    IP-Adapter) on every row; after the job each module holds the units' own functions again."""
    model, cfg = two_concepts
    cfg.concepts[1].control_unit = 1
    unet = model.model.diffusion_model
    with fake_a1111.installed() as modules:
        scripts, params, _ = _with_sd_webui_controlnet(model, ["IPAdapter", "IPAdapter"])
        attn2 = [m for m in unet.modules() if hasattr(m, "ipadapter_hacks")]
        functions = [list(m.ipadapter_hacks) for m in attn2]
        _run_job(modules, model, cfg, ["a man and a woman"], [7], (12, 16), scripts, marked=True)
        assert [list(m.ipadapter_hacks) for m in attn2] == functions
        everywhere = attn2[0].reached
        for m in attn2:
            m.reached = []
        params[0].control_model.embedding.zero_()  # unit 0 off: what reaches a row now is the woman's unit
        own, session = _run_job(modules, model, cfg, ["a man and a woman"], [7], (12, 16), scripts, marked=True)
    assert all(all(row) for row in everywhere)
    pass1, pass2 = attn2[0].reached[:6], attn2[0].reached[6:]
    assert pass1 == [[False, False]] * 6 and [row for row in pass2 if len(row) == 4] == [[False, False, False, True]] * 3
    assert session.infotext["OMG c2 control unit"] == 1


@torch.no_grad()
def test_concept_rows_carry_sd_webui_controlnets_prompt_marks_and_share_the_host_rows_call(two_concepts):
    """sd-webui-controlnet marks each prompt's conditioning as cond or uncond and reads the marks in its forward:
    concept rows get their host rows' marks (so an uncond concept row is told from a cond one) and run in the host
    rows' call; the image is the one made without marks."""
    model, cfg = two_concepts
    cfg.concept_guidance = "own"  # concept uncond rows too
    with fake_a1111.installed() as modules:
        scripts, _, seen = _with_sd_webui_controlnet(model, [])
        plain, _ = _run_job(modules, model, cfg, ["a man and a woman"], [7], (12, 16), scripts)
        seen.clear()
        marked, session = _run_job(modules, model, cfg, ["a man and a woman"], [7], (12, 16), scripts, marked=True)
    # pass 2 from the blend start: host cond and uncond, then each concept's cond and uncond, in one call
    assert [(rows, marks) for rows, _, marks in seen[6:]] == [(6, [1, 0, 1, 0, 1, 0])] * 3
    assert [c.cond["context"].shape[1] for c in session.conds] == [78, 78]
    torch.testing.assert_close(marked, plain)


@pytest.mark.parametrize("unit, kinds, message", [
    (2, ["ControlNet", "ControlNet"], "OMG concept 2: ControlNet unit 2 is not enabled"),
    (0, ["T2I_StyleAdapter"], "OMG concept 2: ControlNet unit 0 has neither a ControlNet nor an IP-Adapter model"),
])
@torch.no_grad()
def test_a_concepts_unit_that_cannot_be_given_to_it_is_named_and_nothing_stays_wrapped(two_concepts, unit, kinds, message):
    model, cfg = two_concepts
    cfg.concepts[1].control_unit = unit
    with fake_a1111.installed() as modules:
        scripts, params, _ = _with_sd_webui_controlnet(model, kinds)
        with pytest.raises(a1111.OmgUserError, match=message):
            _run_job(modules, model, cfg, ["a man and a woman"], [7], (12, 16), scripts)
    assert all(isinstance(param.control_model, _ControlModel) for param in params)


@pytest.mark.parametrize("prompts", [["a man AND a woman"], ["a man and a woman", "a man AND a woman on grass"]])
def test_and_in_any_prompt_of_the_job_is_refused_before_sampling_with_what_to_do(prompts):
    p = types.SimpleNamespace(all_prompts=prompts)
    with pytest.raises(a1111.OmgUserError, match="does not take AND .* without AND, and put each character's details in its concept prompt"):
        a1111.A1111Generation(p, OmgConfig(enabled=True))
    row_tracker.refuse_and(["a man and a woman, ANDROID", "sANDy beach"])  # only the whole upper-case word is AND
