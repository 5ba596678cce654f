"""The distil method on a small model: it starts from the sum of the LoRAs, and its training brings the merged
model's predictions to each concept's own LoRA's on that concept's pictures, touching no weight of the model."""
import pytest
import torch
from torch import nn

from omg_ext.engine.lora import DenseDelta, RowRoutedLoRA
from omg_ext.merge.distil import DistilSettings, Teaching, distil, loss_weight


class _Denoiser(nn.Module):
    """A noise predictor with a convolution and a linear layer, conditioned on a context vector."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.mix = nn.Conv2d(2, 2, 3, padding=1), nn.Linear(2, 2)

    def forward(self, x, t, context):
        h = torch.tanh(self.conv(x) + context[:, :, None, None])
        return self.mix(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _setup():
    model = _Denoiser()
    layers = {"lora_unet_conv": model.conv, "lora_unet_mix": model.mix}
    g = torch.Generator().manual_seed(1)
    own = [{"lora_unet_conv": torch.randn(2, 2, 3, 3, generator=g) * 0.3, "lora_unet_mix": torch.randn(2, 2, generator=g) * 0.5}
           for _ in range(2)]
    contexts = [torch.tensor([[2.0, -2.0]]), torch.tensor([[-2.0, 2.0]])]  # each concept's prompt
    pictures = [torch.randn(6, 2, 5, 7, generator=g) for _ in range(2)]
    routers = [RowRoutedLoRA(layers, [{k: DenseDelta(d) for k, d in deltas.items()}]) for deltas in own]

    def teacher(j, index, x_t, t):
        with routers[j].installed(), routers[j].route_all(0):
            return model(x_t, t, contexts[j].expand(len(index), -1))

    def student(j, index, x_t, t):
        return model(x_t, t, contexts[j].expand(len(index), -1))

    teaching = Teaching(pictures, teacher, student, torch.linspace(0.99, 0.05, 100))
    start = {k: (own[0][k] + own[1][k]).flatten(1) for k in layers}
    return model, layers, own, teaching, start


def _gap(model, layers, merged, teaching) -> float:
    """Mean squared gap between the merged model and each concept's own LoRA on its noised pictures."""
    router = RowRoutedLoRA(layers, [{k: DenseDelta(d.reshape(layers[k].weight.shape)) for k, d in merged.items()}])
    g, gaps = torch.Generator().manual_seed(5), []
    with torch.no_grad():
        for j, pictures in enumerate(teaching.pictures):
            x_t = pictures + 0.3 * torch.randn(pictures.shape, generator=g)
            index, t = torch.arange(len(pictures)), torch.zeros(len(pictures))
            with router.installed(), router.route_all(0):
                pred = teaching.student(j, index, x_t, t)
            gaps.append(float((pred - teaching.teacher(j, index, x_t, t)).pow(2).mean()))
    return sum(gaps) / len(gaps)


def test_distil_starts_from_the_sum_of_the_loras():
    model, layers, _, teaching, start = _setup()
    merged = distil(layers, start, teaching, DistilSettings(steps=1, lr=0.0, rank=8))
    for key in layers:
        assert torch.allclose(merged[key], start[key], atol=1e-5)


def test_distil_brings_each_concepts_predictions_to_its_own_loras_and_leaves_the_model_as_it_was():
    model, layers, _, teaching, start = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    merged = distil(layers, start, teaching, DistilSettings(steps=150, lr=3e-2, rows=6, rank=8),
                    lambda text, done: seen.append(text))
    assert _gap(model, layers, merged, teaching) <= 0.5 * _gap(model, layers, start, teaching)  # measured 0.45
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in layers.values())
    assert seen[0] == "distilling: step 1 of 150" and len(seen) == 150


def test_an_interrupt_while_distilling_leaves_no_hook():
    model, layers, _, teaching, start = _setup()

    def progress(text, done):
        if text.startswith("distilling: step 3 "):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distil(layers, start, teaching, DistilSettings(steps=10), progress)
    assert all(not m._forward_hooks for m in layers.values())


def test_the_loss_weighs_the_noise_error_fully_where_the_noise_is_heavy_and_as_the_pictures_error_where_it_is_light():
    alphas = torch.tensor([0.99, 0.8, 0.5, 0.2, 0.01])
    expected = torch.tensor([0.01 / 0.99, 0.2 / 0.8, 1.0, 1.0, 1.0])
    torch.testing.assert_close(loss_weight(alphas), expected)
