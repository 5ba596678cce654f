"""Row-routed LoRA: each concept's delta reaches exactly its rows, equal to merging it."""
import pytest
import torch
from torch import nn

from omg_ext.engine.lora import DenseDelta, LowRankDelta, RowRoutedLoRA
from minisd.loras import merged, random_dense, random_lowrank

torch.manual_seed(0)


class Layers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 24)
        self.conv3 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)


def _inputs(rows):
    g = torch.Generator().manual_seed(1)
    return {"fc": torch.randn(rows, 5, 16, generator=g), "conv3": torch.randn(rows, 8, 9, 9, generator=g),
            "conv1": torch.randn(rows, 8, 6, 6, generator=g), "grouped": torch.randn(rows, 8, 6, 6, generator=g),
            "dilated": torch.randn(rows, 8, 7, 7, generator=g)}


def _concepts(model):
    a = {"fc": random_lowrank(model.fc, seed=1), "conv3": random_lowrank(model.conv3, seed=2),
         "conv1": LowRankDelta(torch.randn(8, 2), torch.randn(2, 8), scale=0.7),  # 2-D factors on a 1x1 conv
         "grouped": random_dense(model.grouped, seed=3, bias=True), "dilated": random_lowrank(model.dilated, seed=7)}
    b = {"fc": random_dense(model.fc, seed=4, bias=True), "conv3": random_lowrank(model.conv3, seed=5, mid=True),
         "conv1": random_lowrank(model.conv1, seed=6), "dilated": random_dense(model.dilated, seed=8)}
    return [a, b]


@torch.no_grad()
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("layer", ["fc", "conv3", "conv1", "grouped", "dilated"])
def test_each_concept_row_equals_its_merged_layer(layer, channels_last):
    """Also with A1111's --opt-channelslast: conv outputs that are not contiguous in NCHW."""
    model = Layers()
    concepts = _concepts(model)
    router = RowRoutedLoRA(dict(model.named_modules()), concepts)
    x = _inputs(5)[layer]
    if channels_last:
        if layer == "fc":
            pytest.skip("a Linear has no channels")
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    # rows: 0 global, 1-2 concept a, 3 concept b, 4 global
    with router.installed(), router.route([(0, 1, 3), (1, 3, 4)], batch=5):
        routed = getattr(model, layer)(x)
    plain = getattr(model, layer)(x)
    torch.testing.assert_close(routed[[0, 4]], plain[[0, 4]], rtol=0, atol=0)
    for j, rows in ((0, [1, 2]), (1, [3])):
        if layer not in concepts[j]:
            torch.testing.assert_close(routed[rows], plain[rows], rtol=0, atol=0)
            continue
        reference = getattr(merged(model, {layer: concepts[j][layer]}), layer)(x[rows])
        assert not torch.allclose(reference, plain[rows], atol=1e-3), "the delta must matter"
        torch.testing.assert_close(routed[rows], reference, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_hooks_removed_and_weights_untouched_even_on_error():
    model = Layers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    router = RowRoutedLoRA(dict(model.named_modules()), _concepts(model))
    with pytest.raises(RuntimeError, match="boom"):
        with router.installed(), router.route([(0, 0, 1)], batch=1):
            model.fc(torch.randn(1, 16))
            assert all(len(m._forward_hooks) == 1 for m in (model.fc, model.conv3, model.conv1))
            raise RuntimeError("boom")
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert router.spans == () and router.batch is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@torch.no_grad()
def test_route_all_for_text_encoder_and_idle_router_changes_nothing():
    model = Layers()
    concepts = _concepts(model)
    router = RowRoutedLoRA(dict(model.named_modules()), concepts)
    x = torch.randn(3, 16)
    with router.installed():
        idle = model.fc(x)
        with router.route_all(1):
            every = model.fc(x)
    torch.testing.assert_close(idle, model.fc(x), rtol=0, atol=0)
    torch.testing.assert_close(every, merged(model, {"fc": concepts[1]["fc"]}).fc(x), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_batch_split_inside_the_model_is_refused():
    model = Layers()
    router = RowRoutedLoRA(dict(model.named_modules()), _concepts(model))
    with router.installed(), router.route([(0, 0, 2)], batch=4):
        with pytest.raises(RuntimeError, match="fc got 2 rows, the routed call has 4"):
            model.fc(torch.randn(2, 16))


@torch.no_grad()
def test_deltas_follow_the_input_dtype():
    model = Layers().double()
    delta = random_lowrank(model.fc, seed=1)
    router = RowRoutedLoRA(dict(model.named_modules()), [{"fc": delta}])
    x = torch.randn(2, 16, dtype=torch.float64)
    with router.installed(), router.route([(0, 0, 2)], batch=2):
        out = model.fc(x)
    assert out.dtype == torch.float64
    expected = model.fc(x) + (x @ delta.down.double().T @ delta.up.double().T) * delta.scale
    torch.testing.assert_close(out, expected)
    model.float()  # the same delta, later in another dtype (a host casting its model between jobs)
    with router.installed(), router.route([(0, 0, 2)], batch=2):
        again = model.fc(x.float())
    assert again.dtype == torch.float32
    torch.testing.assert_close(again, expected.float(), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_deltas_follow_the_layers_device_and_compute_dtype():
    """--lowvram / --medvram and Forge move layers between devices while the job runs; A1111's
    autocast makes a layer take float32 and return half precision."""
    model = Layers()
    delta = random_lowrank(model.fc, seed=1)
    router = RowRoutedLoRA(dict(model.named_modules()), [{"fc": delta}])
    x, weights = torch.randn(2, 16), {k: v.clone() for k, v in model.state_dict().items()}
    with router.installed(), router.route([(0, 0, 2)], batch=2):
        on_cpu = model.fc(x)
        model.to("meta")  # offloaded: the next call runs wherever the layer now is
        assert model.fc(x.to("meta")).device.type == "meta"
        model.to_empty(device="cpu").load_state_dict(weights)
        torch.testing.assert_close(model.fc(x), on_cpu)  # and back
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model.fc(x)  # float32 in, bfloat16 out: the delta in bfloat16 too
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), on_cpu, rtol=2e-2, atol=2e-2)


def test_bad_deltas_are_named():
    model = Layers()
    with pytest.raises(ValueError, match="concept 2 targets 'nope'"):
        RowRoutedLoRA(dict(model.named_modules()), [{}, {"nope": random_lowrank(model.fc)}])
    with pytest.raises(ValueError, match="LoRA for fc: factors give 24x8, the layer is \\(24, 16\\)"):
        RowRoutedLoRA(dict(model.named_modules()), [{"fc": LowRankDelta(torch.randn(24, 2), torch.randn(2, 8))}])
    with pytest.raises(ValueError, match="LoRA for fc: delta"):
        RowRoutedLoRA(dict(model.named_modules()), [{"fc": DenseDelta(torch.randn(3, 3))}])


def test_dense_form_of_lowrank_matches_its_forward():
    model = Layers()
    for module, mid in ((model.conv3, False), (model.conv3, True), (model.fc, False)):
        delta = random_lowrank(module, seed=7, mid=mid).check(module, "x")
        x = torch.randn(2, *((8, 9, 9) if module is model.conv3 else (16,)))
        via_dense = (torch.nn.functional.conv2d(x, delta.dense(), stride=2, padding=1)
                     if module is model.conv3 else x @ delta.dense().T)
        out = torch.zeros_like(via_dense)
        delta.add_to(out, x, module)
        torch.testing.assert_close(out, via_dense, rtol=1e-4, atol=1e-5)
