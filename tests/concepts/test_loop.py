"""The extraction loop on a small random toy model: its loss and E-step against independent computations, what it
returns, and that the model is left exactly as it was after success, a mistake and an interrupt in every phase."""
import pytest
import torch
import torch.nn.functional as F

from omg_ext.concepts.estep import masks_from_maps, token_maps
from omg_ext.concepts.extract import BACKGROUND, concept_tokens, extract, whole_prompt
from omg_ext.concepts.mstep import masked_mse
from omg_ext.concepts.settings import ExtractConcept, ExtractError, ExtractSettings
from toyworld.extraction import concept_model
from toyworld.model import ToyModel


@pytest.fixture(scope="module")
def model():
    return ToyModel(seed=4).eval()


def _concepts(masks=None):
    return [ExtractConcept("xzorb", "man", [masks[0]] if masks is not None else []),
            ExtractConcept("xquix", "woman", [masks[1]] if masks is not None else [])]


def _picture(seed=0, images=1):
    return torch.randn(images, 3, 24, 24, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)


FAST = dict(rounds=2, steps=3, estep_timesteps=(300,), estep_draws=1)


def test_the_masked_loss_is_the_mean_squared_error_over_the_masks_pixels():
    g = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    masks = (torch.rand(3, 5, 6, generator=g) > 0.5).float()
    masks[2] = 0
    got = masked_mse(prediction, target, masks)
    for r in range(2):
        inside = masks[r].bool()
        expected = ((prediction[r] - target[r]) ** 2)[:, inside].mean()  # every channel of every pixel inside
        assert got[r] == pytest.approx(float(expected), rel=1e-5)
    assert got[2] == 0  # nothing to explain, not a division by zero
    soft = torch.full((1, 5, 6), 0.5)
    assert masked_mse(prediction[:1], target[:1], soft)[0] == pytest.approx(float(((prediction[0] - target[0]) ** 2).mean()), rel=1e-5)


def test_token_maps_are_the_heads_mean_probability_of_the_tokens_at_the_capture_layers(model):
    cm = concept_model(model)
    latents = _picture(images=2)
    prompts = ["a man and a woman on grass", "a woman and a man in snow"]
    context = model.encode(prompts)["context"]
    tokens = [[[2], [5]], [[5], [2]]]  # image 1 names its concepts in the other order
    maps = token_maps(cm, latents, context, tokens, (500,), 1, torch.Generator().manual_seed(3))
    # independently: the same noise, every attn2 at 12 and 6 px, softmax(q kᵀ · scale) read off its projections
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    a = cm.alphas_cumprod[500]
    x = a.sqrt() * latents + (1 - a).sqrt() * noise
    expected = torch.zeros(2, 2, 12, 12)
    hooks = []
    for name, module in model.unet.named_modules():
        if name.endswith("attn2"):
            def hook(m, inputs, out):
                q, k = m.to_q(inputs[0]), m.to_k(context)
                b, n, _ = q.shape
                side = int(n ** 0.5)
                if side not in (12, 6):
                    return
                qh, kh = (t.view(b, -1, m.heads, t.shape[-1] // m.heads).transpose(1, 2) for t in (q, k))
                probs = torch.softmax(qh @ kh.transpose(-1, -2) * m.scale, -1).mean(1)  # [b, n, tokens]
                for i in range(2):
                    for j in range(2):
                        word = probs[i, :, tokens[i][j]].sum(-1).view(1, 1, side, side)
                        expected[i, j] += F.interpolate(word, size=(12, 12), mode="bilinear", align_corners=False)[0, 0]
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model.unet(x, torch.full((2,), 500.0), context=context)
    for h in hooks:
        h.remove()
    assert expected.abs().sum() > 0
    assert torch.allclose(maps, expected, atol=1e-5)


def test_masks_from_maps_give_each_figure_to_its_concept_exclusively():
    maps = torch.zeros(1, 2, 12, 12)
    maps[0, 0, 2:10, 1:5] = 1.0  # concept 0 on the left
    maps[0, 1, 2:10, 7:11] = 1.0  # concept 1 on the right
    maps[0, 1, 2:10, 1:5] = 0.2  # and a little on the left figure
    for split in ("figures", "pixels"):
        masks = masks_from_maps(maps, (24, 24), ["man", "woman"], split)
        assert masks.shape == (1, 2, 24, 24)
        assert set(masks.unique().tolist()) <= {0.0, 1.0} and float(masks.sum(1).max()) == 1.0
        assert masks[0, 0, 10, 4] == 1 and masks[0, 1, 10, 18] == 1 and masks[0, 0, 10, 18] == 0


def test_concept_tokens_are_the_embeddings_vectors_and_the_class_word_after_them(model):
    cm = concept_model(model)
    embeddings = {"xzorb": torch.zeros(2, 64), "xquix": torch.zeros(3, 64), BACKGROUND: torch.zeros(1, 64)}
    concepts = [ExtractConcept("xzorb", "man"), ExtractConcept("xquix", "man")]  # two men: each its own "man"
    prompt = whole_prompt(concepts, background=True)
    assert prompt == f"a xzorb man and a xquix man {BACKGROUND}"
    # <bos> a xzorb xzorb man and a xquix xquix xquix man bg
    assert concept_tokens(cm, prompt, concepts, embeddings) == [[2, 3, 4], [7, 8, 9, 10]]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {k: p.requires_grad for k, p in model.named_parameters()}


def _assert_unchanged(model, snapshot):
    state, flags = snapshot
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("lora", [False, True])
def test_an_extraction_learns_vectors_keeps_each_rounds_masks_and_leaves_the_model_as_it_was(model, lora):
    model.requires_grad_(True)  # a host whose weights still ask for gradients keeps none either
    snapshot = _snapshot(model)
    cm = concept_model(model)
    start = {"man": cm.init_vectors("man", 2).clone(), "woman": cm.init_vectors("woman", 2).clone()}
    reports = []
    result = extract(cm, _picture(), _concepts(), ExtractSettings(**FAST, lora=lora), report=lambda t, d: reports.append(d))
    try:
        _assert_unchanged(model, snapshot)
    finally:
        model.requires_grad_(False)
    assert list(result.vectors) == ["xzorb", "xquix"]
    assert result.vectors["xzorb"].shape == (2, 64) and not result.vectors["xzorb"].requires_grad
    assert not torch.equal(result.vectors["xzorb"], start["man"]) and not torch.equal(result.vectors["xquix"], start["woman"])
    assert len(result.rounds) == 3 and result.rounds[0].loss is None and all(r.loss > 0 for r in result.rounds[1:])
    assert all(r.masks.shape == (1, 2, 24, 24) and float(r.masks.sum(1).max()) <= 1 for r in result.rounds)
    assert reports == sorted(reports) and reports[-1] == 1.0 and len(reports) >= 2 * 3 + 3
    if lora:
        tensors = result.loras["xzorb"]
        ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
        assert ups and all(v.dtype == torch.float16 for v in ups) and any(v.abs().sum() > 0 for v in ups)
        assert all(k.startswith("lora_unet_") for k in tensors)
        assert any(not torch.equal(v, result.loras["xquix"][k]) for k, v in tensors.items() if k.endswith("up.weight"))
    else:
        assert result.loras == {}


def test_the_same_request_gives_the_same_result(model):
    cm = concept_model(model)
    a = extract(cm, _picture(), _concepts(), ExtractSettings(**FAST))
    b = extract(cm, _picture(), _concepts(), ExtractSettings(**FAST))
    assert torch.equal(a.vectors["xzorb"], b.vectors["xzorb"])
    assert all(torch.equal(x.masks, y.masks) for x, y in zip(a.rounds, b.rounds))


def test_drawn_masks_are_the_first_masks_or_held_fixed(model):
    cm = concept_model(model)
    drawn = torch.zeros(2, 48, 48)  # drawn at the picture's size, twice the latent's here
    drawn[0, :, :20] = 1
    drawn[1, :, 24:] = 1
    expected = F.interpolate(drawn[None], size=(24, 24), mode="area")[0] > 0.5
    fixed = extract(cm, _picture(), _concepts(drawn), ExtractSettings(**FAST, user_masks="fixed"))
    assert all(torch.equal(r.masks[0].bool(), expected) for r in fixed.rounds)
    first = extract(cm, _picture(), _concepts(drawn), ExtractSettings(**FAST, user_masks="first"))
    assert torch.equal(first.rounds[0].masks[0].bool(), expected)
    assert not all(torch.equal(r.masks[0].bool(), expected) for r in first.rounds[1:])  # EM moved on from them


class Stop(Exception):
    pass


@pytest.mark.parametrize("at", [0, 1, 4, 7])  # round 0's E-step, the first step, a later step, the last E-step
def test_an_interrupt_in_any_phase_stops_the_loop_and_leaves_the_model_as_it_was(model, at):
    snapshot = _snapshot(model)
    calls = []

    def check():
        calls.append(1)
        if len(calls) > at:
            raise Stop

    with pytest.raises(Stop):
        extract(concept_model(model), _picture(), _concepts(), ExtractSettings(**FAST, lora=True), check=check)
    _assert_unchanged(model, snapshot)


def test_an_error_inside_the_model_leaves_it_as_it_was(model):
    snapshot = _snapshot(model)
    cm = concept_model(model)
    calls = []

    def failing(x, t, c):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("out of memory")
        return model.unet(x, t.float(), context=c)

    cm.predict = failing
    with pytest.raises(RuntimeError, match="out of memory"):
        extract(cm, _picture(), _concepts(), ExtractSettings(**FAST, lora=True))
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize("change, message", [
    (dict(settings=dict(steps=0)), "steps must be a whole number of at least 1, got 0"),
    (dict(settings=dict(rounds=-1)), "rounds must be a whole number of at least 0"),
    (dict(settings=dict(vectors=20)), "vectors must be at most 16"),
    (dict(settings=dict(learning_rate=0)), r"learning_rate must be a number in \(0, 1\]"),
    (dict(settings=dict(user_masks="always")), "user_masks must be one of first, fixed"),
    (dict(settings=dict(estep_evidence="fit")), "estep_evidence must be one of attention, attention×fit"),
    (dict(concepts=[ExtractConcept("xzorb", " ")]), "concept 'xzorb' has no class word"),
    (dict(concepts=[ExtractConcept("a b", "man")]), "the concept name 'a b' must be one word"),
    (dict(concepts=[ExtractConcept("xa", "man"), ExtractConcept("XA", "woman")]), "two concepts share a name: xa, XA"),
    (dict(concepts=[ExtractConcept("xa", "man", [None, None])]), "concept 'xa' has 2 masks for 1 pictures"),
    (dict(concepts=[]), "extract 1 to 4 concepts, got 0"),
])
def test_bad_requests_are_refused_with_a_message_naming_the_mistake(model, change, message):
    with pytest.raises(ExtractError, match=message):
        extract(concept_model(model), _picture(), change.get("concepts", _concepts()),
                ExtractSettings(**{**FAST, **change.get("settings", {})}))


@pytest.mark.parametrize("lora", [False, True])
def test_rows_run_one_at_a_time_learn_what_all_at_once_learn(model, lora):
    """``rows_per_pass`` bounds memory only: the gradients of a step add up to the same, so the vectors agree."""
    cm = concept_model(model)
    pictures = _picture(images=2)
    together = extract(cm, pictures, _concepts(), ExtractSettings(**FAST, lora=lora))
    rows, predict = [], cm.predict
    cm.predict = lambda x, t, c: (rows.append(x.shape[0]), predict(x, t, c))[1]
    apart = extract(cm, pictures, _concepts(), ExtractSettings(**FAST, lora=lora, rows_per_pass=1))
    assert rows.count(1) == 2 * 3 * 2 * 3  # rounds x steps x (pictures x (1 + concepts)) training rows, one by one
    for name in ("xzorb", "xquix"):
        assert torch.allclose(together.vectors[name], apart.vectors[name], atol=1e-5)
    assert all(a.loss == pytest.approx(b.loss, rel=1e-5) for a, b in zip(together.rounds[1:], apart.rounds[1:]))
    if lora:
        key = next(k for k in together.loras["xzorb"] if k.endswith("up.weight"))
        assert torch.allclose(together.loras["xzorb"][key].float(), apart.loras["xzorb"][key].float(), atol=1e-3)


def test_responsibilities_weigh_each_pixel_by_how_much_better_a_row_explains_it():
    from omg_ext.concepts.estep import responsibilities

    errors = torch.tensor([[[[0.1, 0.5]], [[0.3, 0.5]]]])  # [1 picture, 2 concepts, 1, 2]
    r = responsibilities(errors)
    tau = 0.2  # the mean error of the first pixel
    expected = torch.exp(torch.tensor([-0.1 / tau, -0.3 / tau]))
    assert torch.allclose(r[0, :, 0, 0], expected / expected.sum())
    assert torch.allclose(r[0, :, 0, 1], torch.tensor([0.5, 0.5]))  # equal errors: no evidence either way
    assert torch.allclose(r.sum(1), torch.ones(1, 1, 2))


def test_a_step_that_runs_out_of_memory_is_retried_with_half_the_rows_and_learns_the_same(model):
    """``rows_per_pass`` 0 starts with every row at once and halves the count when the device runs out of memory
    (6 rows -> 3 -> 2 -> 1 here), each retry from the same draw; a count the user set is kept and the error shown."""
    cm = concept_model(model)
    pictures = _picture(images=2)
    apart = extract(cm, pictures, _concepts(), ExtractSettings(**FAST, rows_per_pass=1))
    rows, predict = [], cm.predict

    def small_card(x, t, c):
        if torch.is_grad_enabled():  # a training pass
            rows.append(x.shape[0])
            if x.shape[0] > 1:
                raise torch.OutOfMemoryError("CUDA out of memory")
        return predict(x, t, c)

    cm.predict = small_card
    fitted = extract(cm, pictures, _concepts(), ExtractSettings(**FAST))
    assert rows[:4] == [6, 3, 2, 1] and rows.count(6) == rows.count(3) == rows.count(2) == 1  # remembered afterwards
    for name in ("xzorb", "xquix"):
        assert torch.allclose(fitted.vectors[name], apart.vectors[name], atol=1e-5)
    with pytest.raises(torch.OutOfMemoryError):
        extract(cm, pictures, _concepts(), ExtractSettings(**FAST, rows_per_pass=2))
