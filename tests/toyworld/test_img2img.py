"""img2img in the toy world: the sampler starts from the init picture and runs the last ``strength · steps``
steps; the init pictures carry their true figures; and OMG keeps both identities in img2img where global LoRAs
do not (committed weights, 8 images at strength 0.65; ``benchmarks/bench_img2img.py`` measures 240).

Measured on these seeds: identities kept OMG 0.875, OMG with masks from the init picture 0.75, global LoRAs
0.125; layout IoU with the init picture's figures 0.535, 0.533, 0.369. With img2img broken (both passes from
noise, the init picture used only for the masks) the init-mask variant keeps 0.25 and its layout IoU is 0.111:
the assertions fail."""
import numpy as np
import pytest
import torch

from minisd.sampling import DiscreteSchedule, generate, initial_noise
from toyworld.img2img import METHODS, init_pictures
from tests.toyworld.test_quality import pooled, world  # noqa: F401 - world: the toy world fixture
from toyworld.methods import Case, Img2Img
from toyworld.scenes import SIZE

CASES = (Case((1, 2), "on grass"), Case((3, 4), "at night", in_front=True))
SEEDS = list(range(1000, 1004))


def test_img2img_sampling_runs_the_last_steps_from_the_noised_init_picture():
    calls, init, schedule = [], torch.randn(2, 3, 8, 8), DiscreteSchedule()

    def no_change(x, t, c, rows):  # predicts no noise: Euler then keeps its start
        calls.append(float(t.max()))
        return torch.zeros_like(x)

    cond = {"context": torch.zeros(2, 4, 8)}
    out = generate(no_change, schedule, "euler", cond, cond, seed=0, steps=20, latent_shape=(2, 3, 8, 8), seeds=[3, 4],
                   init=init, strength=0.65)
    sigmas = schedule.get_sigmas(20)
    assert len(calls) == 13  # int(0.65 · 20) steps, one batched call each
    assert calls[0] == pytest.approx(float(schedule.sigma_to_t(sigmas[7:8])[0]))
    assert torch.allclose(out, init + initial_noise((2, 3, 8, 8), 0, [3, 4]) * sigmas[7])
    calls.clear()
    generate(no_change, schedule, "euler", cond, cond, seed=0, steps=20, latent_shape=(2, 3, 8, 8), init=init, strength=0.01)
    assert len(calls) == 1  # at least one step


def test_init_pictures_show_a_plain_man_and_woman_where_their_true_masks_say():
    pictures, kinds = init_pictures(CASES[1], SEEDS)
    assert pictures.shape == (4, 3, SIZE, SIZE) and kinds.shape == (4, SIZE, SIZE)
    assert float(pictures.min()) >= -1 and float(pictures.max()) <= 1
    for b in range(4):
        assert set(np.unique(kinds[b].numpy())) == {0, 1, 2}
    assert not torch.equal(pictures[0], pictures[1])


def _pooled(world, method) -> dict[str, float]:
    def made(case):
        pictures, true_kinds = init_pictures(case, SEEDS)
        return METHODS[method](world, case, SEEDS, Img2Img(pictures, 0.65)).images, true_kinds
    return pooled(world, CASES, made)


@torch.no_grad()
def test_omg_in_img2img_keeps_both_identities_where_global_loras_do_not(world):
    ours, theirs, init_masks = (_pooled(world, m) for m in ("OMG", "global LoRAs", "OMG init masks"))
    assert ours["identities_kept"] >= theirs["identities_kept"] + 0.25, (ours, theirs)
    assert init_masks["identities_kept"] >= theirs["identities_kept"] + 0.25, (init_masks, theirs)
    assert init_masks["layout_iou"] >= 0.5, init_masks
