"""The toy world's measures: exact on hand-made labels, near-perfect on the generator's own scenes."""
import numpy as np
import pytest
import torch

from toyworld.measures import ConceptLook, figure_in_mask, image_measures, mask_precision, present_fidelity, summarise
from toyworld.scenes import random_scene, render
from toyworld.scorer import Scorer

ZORB_MAN, QUIX_WOMAN = ConceptLook(1), ConceptLook(2)


def _labels():
    kinds, looks = torch.zeros(24, 20, dtype=torch.long), torch.zeros(24, 20, dtype=torch.long)
    kinds[2:14, 2:6], looks[2:14, 2:6] = 1, 1          # a man, 48 px, in zorb's look
    kinds[10:22, 12:18], looks[10:22, 12:18] = 2, 2    # a woman, 72 px, in quix's look
    return kinds, looks


def test_measures_of_a_known_picture():
    kinds, looks = _labels()
    looks[10:16, 12:18] = 1  # the top half of the woman in the man's look (36 of 72 px)
    looks[0, 0] = 2          # one background pixel in an identity look
    layout = torch.zeros_like(kinds)
    layout[2:14, 2:6] = 1
    result = image_measures(kinds, looks, [ZORB_MAN, QUIX_WOMAN], layout)
    assert result["fidelity"] == pytest.approx((1.0 + 0.5) / 2)
    assert result["leakage"] == pytest.approx((0.0 + 0.5) / 2)
    assert result["background"] == pytest.approx(1 / (24 * 20 - 48 - 72))
    assert result["both_present"] == 1.0 and result["identities_kept"] == 0.0  # the woman is only half hers
    assert result["layout_iou"] == pytest.approx(48 / (48 + 72))


def test_a_missing_figure_scores_nothing_for_its_concept():
    kinds, looks = _labels()
    kinds[kinds == 2], looks[looks == 2] = 0, 0
    result = image_measures(kinds, looks, [ZORB_MAN, QUIX_WOMAN])
    assert result["fidelity"] == 0.5 and result["both_present"] == 0.0 and result["identities_kept"] == 0.0


def test_summary_is_mean_and_95_percent_interval():
    mean, half = summarise([0.0, 1.0, 1.0, 0.0])
    assert mean == 0.5 and half == pytest.approx(1.96 * (1 / 3) ** 0.5 / 2)


@torch.no_grad()
def test_the_committed_scorer_reads_rendered_scenes_almost_perfectly():
    scorer, rng = Scorer.load(), np.random.default_rng(11)
    scores = []
    for _ in range(40):
        image, _, _ = render(random_scene(rng, looks=(1, 2)), rng=rng)
        kinds, looks = scorer.labels(torch.from_numpy(image)[None])
        scores.append(image_measures(kinds[0], looks[0], [ZORB_MAN, QUIX_WOMAN]))
    assert np.mean([s["fidelity"] for s in scores]) > 0.97
    assert np.mean([s["leakage"] for s in scores]) < 0.01


def test_mask_precision_is_the_share_of_each_mask_on_its_own_figure():
    kinds, _ = _labels()
    masks = torch.zeros(2, 24, 20)
    masks[0, 2:14, 2:6] = 1.0    # exactly the man
    masks[1, 10:22, 12:18] = 0.5  # the woman, at half strength...
    masks[1, 0:2, 0:6] = 0.5      # ...and 12 px of background
    assert mask_precision(masks, kinds, [ZORB_MAN, QUIX_WOMAN]) == pytest.approx([1.0, 36 / 42])
    assert mask_precision(torch.zeros(2, 24, 20), kinds, [ZORB_MAN, QUIX_WOMAN]) == [0.0, 0.0]


def test_where_a_figure_lies_against_its_mask_and_the_look_inside_and_outside():
    kinds, looks = _labels()
    looks[16:22, 12:18] = 0  # the woman's lower half (36 of 72 px) plain
    kinds[0:2, 0:5] = 1      # a stray 10-px bit of man: the man's figure (largest part 48 px) is present
    masks = torch.zeros(2, 24, 20)
    masks[0, 2:8, 2:6] = 1    # half of the man's body (24 of 48 px)
    masks[1, 10:22, 12:18] = 0.9
    assert figure_in_mask(masks, kinds, looks, [ZORB_MAN, QUIX_WOMAN]) == [
        pytest.approx((24 / 58, 1.0, 24 / 34)), pytest.approx((1.0, 0.5, None), nan_ok=True)]
    kinds[kinds == 2] = 0
    assert len(figure_in_mask(masks, kinds, looks, [ZORB_MAN, QUIX_WOMAN])) == 1  # only present figures
    assert present_fidelity(kinds, looks, [ZORB_MAN, QUIX_WOMAN]) == [pytest.approx(48 / 58)]
