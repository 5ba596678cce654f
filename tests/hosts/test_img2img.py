"""OMG in img2img and inpainting on the A1111 stand-in: both passes are the host's own img2img sampling from the
init latent (the steps denoising strength × steps leaves), concept masks cut to the inpainted area, SAM and the
detector shown the init picture, and a strength that leaves no blended step refused with a message."""
import json
import sys
import types

import pytest
import torch

from omg_ext.config import ConceptSpec, OmgConfig
from omg_ext.hosts import a1111
from omg_ext.hosts.errors import OmgUserError
from tests.hosts.test_a1111_adapter import SCHEDULE, _Job, _Model, _networks, hero_file  # noqa: F401 - a fixture
from tests.support import fake_a1111


class _Img2ImgJob(_Job):
    """Enough of ``StableDiffusionProcessingImg2Img``: the sampler starts from the init latent noised to the first
    of the last ``int(strength · steps)`` sigmas; with an inpaint mask the denoiser keeps the init latent outside
    it (``mask``: 1 where kept, ``nmask``: 1 where repainted, [4, h, w] as A1111 makes them), and so does the end."""

    sample_hr_pass = None  # img2img has no hires fix

    def __init__(self, modules, model, prompt, negative, init_latent, strength, inpaint=None, **kwargs):
        super().__init__(modules, model, prompt, negative, seeds=tuple(range(7, 7 + init_latent.shape[0])),
                         latent=tuple(init_latent.shape[-2:]), **kwargs)
        self.init_latent, self.denoising_strength = init_latent, strength
        self.mask = self.nmask = None
        if inpaint is not None:
            self.nmask = inpaint.float().expand(4, *inpaint.shape[-2:])
            self.mask = 1 - self.nmask

    def schedule(self):
        sigmas = SCHEDULE.get_sigmas(self.steps)[self.steps - int(min(self.denoising_strength, 0.999) * self.steps):]
        return self.init_latent + self.rng.next() * sigmas[0], sigmas

    def kept(self, denoised):
        return denoised if self.mask is None else self.init_latent * self.mask + denoised * self.nmask


LATENT = (12, 20)  # 96 x 160 pixels: not square
REGIONS = json.dumps({"width": 160, "height": 96, "boxes": {"1": [0, 0, 80, 96], "2": [80, 0, 160, 96]}})


def _cfg(**changes):
    settings = dict(enabled=True, blend_start=0.3, mask_dilation=0, mask_feather=0, mask_source="regions", regions=REGIONS)
    return OmgConfig(**{**settings, **changes}, concepts=[ConceptSpec(lora="hero", class_word="man", prompt="a man, red cape"),
                                                          ConceptSpec(class_word="woman", prompt="a woman, blue dress")])


def _run(job, model, cfg):
    """The plain img2img job, then the same job with OMG: (plain, OMG, the generation)."""
    c = model.get_learned_conditioning(job.prompts)
    uc = model.get_learned_conditioning(job.negative_prompts)
    seeds = list(job.seeds)
    plain = job.sample(c, uc, seeds, seeds, 0, job.prompts)
    job.rng = job.modules.rng.ImageRNG((4, *LATENT), seeds)
    generation = a1111.A1111Generation(job, cfg)
    generation.attach()
    return plain, job.sample(c, uc, seeds, seeds, 0, job.prompts), generation


@pytest.fixture
def host(monkeypatch, hero_file):
    model = _Model()
    networks, _ = _networks(model, hero_file)
    monkeypatch.setitem(sys.modules, "networks", networks)
    with fake_a1111.installed() as modules:
        yield modules, model
        modules.shared.state.interrupted = False


def _init(images=2):
    return torch.randn(images, 4, *LATENT, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("strength, steps_run, mode, passes", [(0.35, 3, "two passes", 2), (0.75, 7, "two passes", 2),
                                                              (0.75, 7, "fast", 1)])
@torch.no_grad()
def test_img2img_runs_from_the_init_latent_over_the_steps_the_strength_leaves(host, strength, steps_run, mode, passes):
    modules, model = host
    unet = model.model.diffusion_model
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    job = _Img2ImgJob(modules, model, ["a man and a woman", "a man and a woman, night"], "blurry", _init(), strength, steps=10)
    plain, final, generation = _run(job, model, _cfg(mode=mode))
    assert job.calls == (1 + passes) * steps_run  # the plain job and OMG's passes: each the steps the strength leaves
    assert final.shape == (2, 4, *LATENT) and not torch.equal(final[0], final[1])  # a batch of different images
    assert not torch.allclose(final, plain, atol=1e-4)  # the concepts acted
    masks, _ = generation.to_show
    assert masks.shape == (2, 2, *LATENT)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert job.sample_hr_pass is None
    assert job.extra_generation_params["OMG c1 lora"] == "hero"


@torch.no_grad()
def test_inpainting_cuts_each_concepts_mask_to_the_inpainted_area_and_names_one_left_outside(host):
    modules, model = host
    inpaint = torch.zeros(*LATENT)
    inpaint[:, :10] = 1  # the left half is repainted: concept 1's box; concept 2's box lies outside it
    init = _init(1)
    job = _Img2ImgJob(modules, model, "a man and a woman", "blurry", init, 0.6, inpaint=inpaint, steps=10)
    plain, final, generation = _run(job, model, _cfg())
    masks, _ = generation.to_show
    assert float(masks[0, 0, :, :10].sum()) == 12 * 10 and float(masks[0, :, :, 10:].sum()) == 0
    assert "OMG concept 2 not drawn: its mask lies outside the inpaint area" in job.extra_generation_params["OMG warnings"]
    assert torch.equal(final[..., 10:], init[..., 10:])  # outside the inpaint area the host keeps the init latent
    assert not torch.allclose(final[..., :10], plain[..., :10], atol=1e-4)


@torch.no_grad()
def test_a_strength_that_leaves_no_blended_step_is_refused_with_a_message(host):
    modules, model = host
    job = _Img2ImgJob(modules, model, "a man and a woman", "blurry", _init(1), 0.1, steps=10)  # 1 step runs
    with pytest.raises(OmgUserError, match=r"no step would be blended: the blend start 0.6 of the 1 model calls"):
        _run(job, model, _cfg(blend_start=0.6))


@pytest.mark.parametrize("show_layout", [False, True])
@torch.no_grad()
def test_sam_and_the_detector_see_the_init_picture_not_pass_1s(host, monkeypatch, show_layout):
    modules, model = host
    seen, init = [], _init(2)
    monkeypatch.setattr(a1111, "to_pictures", lambda latent: seen.append(latent.clone()) or [
        types.SimpleNamespace(convert=lambda mode: torch.zeros(8, 8, 3).numpy())] * latent.shape[0])
    monkeypatch.setattr(a1111, "mask_models", lambda cfg: None)
    monkeypatch.setattr(a1111, "concept_masks", lambda source, inputs, models: types.SimpleNamespace(
        masks=torch.full((2, *LATENT), 0.5), empty=[], sources=[source], warnings=lambda: []))
    job = _Img2ImgJob(modules, model, "a man and a woman", "blurry", init, 0.6, steps=10)
    _run(job, model, _cfg(mask_source="attention+sam", show_layout=show_layout))
    assert torch.equal(seen[-1], init)  # what SAM is shown
    assert len(seen) == 1 + show_layout  # pass 1's picture decoded only to be shown as the layout
    if show_layout:
        assert not torch.equal(seen[0], init)


@torch.no_grad()
def test_inpainting_only_masked_maps_the_regions_drawn_on_the_whole_picture_into_the_sampled_crop(host):
    """A1111's "only masked" samples the crop ``paste_to`` (x, y, w, h of the whole picture) scaled to the job's
    size: concept 1's box (the picture's left half) fills the crop (its top-left 80x48), concept 2's lies outside."""
    modules, model = host
    job = _Img2ImgJob(modules, model, "a man and a woman", "blurry", _init(1), 0.6, inpaint=torch.ones(*LATENT), steps=10)
    job.paste_to, job.mask_for_overlay = (0, 0, 80, 48), types.SimpleNamespace(size=(160, 96))
    _, _, generation = _run(job, model, _cfg())
    masks, _ = generation.to_show
    assert float(masks[0, 0, :, 10:].sum()) > 0 and float(masks[0, 1].sum()) == 0
    assert "OMG concept 2 not drawn: its mask lies outside the inpaint area" in job.extra_generation_params["OMG warnings"]
    job = _Img2ImgJob(modules, model, "a man and a woman", "blurry", _init(1), 0.6, inpaint=torch.ones(*LATENT), steps=10)
    job.paste_to, job.mask_for_overlay = (96, 48, 40, 24), types.SimpleNamespace(size=(160, 96))  # bottom right
    right = json.dumps({"width": 160, "height": 96, "boxes": {"1": [0, 0, 80, 40], "2": [0, 50, 60, 96]}})
    with pytest.raises(OmgUserError, match="every concept's region lies outside the inpaint area"):
        _run(job, model, _cfg(regions=right))
