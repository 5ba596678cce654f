"""A merge end to end on a small model: inputs recorded, layers fitted, the kohya file written and read back."""
import json
from dataclasses import asdict

import pytest
import torch
from safetensors import safe_open
from torch import nn

from omg_ext.merge.distil import DistilSettings
from omg_ext.merge.lora_out import factorise, write_lora
from omg_ext.merge.merge import MergeConcept, MergeError, MergeSettings, merge, to_file
from omg_ext.merge.record import RowSample, input_rows, recording, weight_matrix


def test_factorise_keeps_the_stated_share_of_energy_at_the_smallest_rank():
    u, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))
    s = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.1] + [0.0] * 5, dtype=torch.float64)
    delta = (u[:, :10] * s) @ v.t()
    energy = s.pow(2).cumsum(0) / s.pow(2).sum()  # 0.753, 0.941, 0.988, ...
    parts = factorise(delta.float(), energy=0.94)
    assert parts.rank == 2
    actual = float((delta.float() - parts.up @ parts.down).norm() / delta.norm())
    assert parts.relative_error == pytest.approx(actual, abs=1e-4) == pytest.approx(float((1 - energy[1]) ** 0.5), abs=1e-4)
    exact = factorise(delta.float(), energy=1.0)
    assert exact.rank == 5 and torch.allclose(exact.up @ exact.down, delta.float(), atol=1e-5)
    assert factorise(delta.float(), energy=0.99, max_rank=2).rank == 2
    with pytest.raises(ValueError, match="energy"):
        factorise(delta.float(), energy=0)


def test_a_convolutions_input_rows_are_its_unfolded_patches():
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    x = torch.randn(2, 3, 7, 5)
    rows = input_rows(conv, x)
    out = (rows @ weight_matrix(conv).t() + conv.bias).reshape(2, -1, 4)
    assert torch.allclose(out.transpose(1, 2).reshape(2, 4, 4, 3), conv(x), atol=1e-5)


def test_a_row_sample_is_bounded_and_uniform_over_every_call():
    sample = RowSample(200, torch.Generator().manual_seed(0))
    for call in range(10):
        sample.add(torch.full((100, 1), float(call)))
    assert sample.rows.shape == (200, 1)
    counts = torch.bincount(sample.rows[:, 0].long(), minlength=10)
    assert counts.min() >= 8 and counts.max() <= 35  # 20 expected from each call


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.conv, self.b = nn.Linear(6, 8), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):  # x [n, 6] -> a 2×2 image through the conv -> [n, 4, 4]
        h = self.a(x)[:, :, None, None].expand(-1, -1, 2, 2)
        return self.b(self.conv(h).flatten(2).transpose(1, 2))


def _concepts(model, n=2, trigger="zorb"):
    g = torch.Generator().manual_seed(1)
    return [MergeConcept(f"char{j}", f"{trigger}{j}" if trigger else "", {
        "lora_a": torch.randn(8, 6, generator=g) * 0.3, "lora_conv": torch.randn(8, 8, 3, 3, generator=g) * 0.1,
        "lora_b": torch.randn(4, 8, generator=g) * 0.3}) for j in range(n)]


def _merge(tmp_path, method="least squares", n=2):
    model = _Model()
    layers = {"lora_a": model.a, "lora_conv": model.conv, "lora_b": model.b}
    concepts = _concepts(model, n)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def record(j, keys):
        with recording({k: layers[k] for k in keys}, rows=64, seed=j) as samples, torch.no_grad():
            model(torch.randn(20, 6, generator=torch.Generator().manual_seed(j)) + j)
        return samples

    merged = merge(layers, concepts, record, MergeSettings(method=method))
    path = tmp_path / "merged.safetensors"
    errors = to_file(path, merged, layers, concepts, MergeSettings(method=method, energy=1.0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model's weights untouched
    return model, layers, concepts, merged, path, errors


def test_the_merged_file_reads_back_as_the_merged_deltas_within_the_svd_error(tmp_path):
    _, layers, concepts, merged, path, errors = _merge(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["omg_merge"])
        tags = json.loads(f.metadata()["ss_tag_frequency"])
        for key, delta in merged.items():
            up, down = f.get_tensor(f"{key}.lora_up.weight").float(), f.get_tensor(f"{key}.lora_down.weight").float()
            alpha = float(f.get_tensor(f"{key}.alpha"))
            assert down.shape[1:] == layers[key].weight.shape[1:]
            read = up.flatten(1) @ down.flatten(1) * alpha / down.shape[0]
            assert float((read - delta).norm() / delta.norm()) <= errors[key] + 2e-3  # fp16 on top of the SVD
    assert keys == {f"{k}.{part}" for k in merged for part in ("lora_up.weight", "lora_down.weight", "alpha")}
    assert [c["trigger"] for c in meta["concepts"]] == ["zorb0", "zorb1"] and meta["method"] == "least squares"
    assert meta["distil"] == asdict(DistilSettings()) and meta["fit"]["ridge"] == 1e-2
    assert set(tags["omg merge"]) == {"zorb0", "zorb1"}


def test_an_existing_file_is_never_overwritten(tmp_path):
    path = tmp_path / "mine.safetensors"
    path.write_bytes(b"the user's own file")
    with pytest.raises(FileExistsError, match="mine.safetensors already exists"):
        write_lora(path, {"k.alpha": torch.tensor(1.0)}, ["t"], {})
    assert path.read_bytes() == b"the user's own file"
    (tmp_path / "x").mkdir()
    _, layers, concepts, merged, _, _ = _merge(tmp_path / "x")
    with pytest.raises(MergeError, match="already exists"):
        to_file(path, merged, layers, concepts, MergeSettings())
    assert path.read_bytes() == b"the user's own file"


@pytest.mark.parametrize("concepts, settings, message", [
    (lambda m: _concepts(m, 1), MergeSettings(), "a merge takes 2 to 12 LoRAs"),
    (lambda m: _concepts(m, 2, trigger=""), MergeSettings(), "has no trigger word"),
    (lambda m: _concepts(m, 2) + _concepts(m, 1), MergeSettings(), "a LoRA is named twice: char0"),
    (lambda m: _concepts(m, 2), MergeSettings(method="average"), "merge method must be one of loraclr, least squares, sum"),
    (lambda m: _concepts(m, 2), MergeSettings(energy=1.5), "energy kept"),
    (lambda m: [MergeConcept("x", "x", {"lora_other": torch.zeros(2, 2)}), *_concepts(m, 1)], MergeSettings(),
     "not in this model"),
])
def test_bad_input_is_named(concepts, settings, message):
    model = _Model()
    layers = {"lora_a": model.a, "lora_conv": model.conv, "lora_b": model.b}
    with pytest.raises(MergeError, match=message):
        merge(layers, concepts(model), lambda j, keys: pytest.fail("recorded before checking"), settings)


def test_an_interrupt_while_fitting_leaves_no_file_and_the_model_as_it_was(tmp_path):
    model = _Model()
    layers = {"lora_a": model.a, "lora_conv": model.conv, "lora_b": model.b}
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def record(j, keys):
        with recording({k: layers[k] for k in keys}, rows=16) as samples, torch.no_grad():
            model(torch.randn(4, 6))
        return samples

    def progress(text, done):
        if text.startswith("fitting layer 2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge(layers, _concepts(model), record, MergeSettings(), progress)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_pre_hooks for m in layers.values())
    assert not list(tmp_path.iterdir())
