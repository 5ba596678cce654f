"""Merging LoRAs on the A1111 stand-in's model: files parsed by the stand-in of the host's loader, the merged
file written to the LoRA folder and read back by it, the model bitwise unchanged after success, error and
Interrupt, and bad input named."""
import pytest
import torch
from safetensors.torch import save_file

from omg_ext.hosts import merge_host, merge_ui
from omg_ext.hosts.errors import OmgUserError
from tests.hosts.test_extract_host import _Model, a1111_with
from tests.support.fake_a1111 import networks as fake_networks

TARGETS = ("input_blocks_1_1_transformer_blocks_0_attn2_to_k", "input_blocks_1_1_transformer_blocks_0_attn1_to_q",
           "input_blocks_1_1_proj_in")


def _write_lora(path, model, seed):
    """A kohya LoRA on three UNet layers (a 1×1 conv among them) and the text encoder's projection."""
    g = torch.Generator().manual_seed(seed)
    modules = {f"lora_unet_{name}": module for name, module in
               ((n.replace(".", "_"), m) for n, m in model.model.diffusion_model.named_modules()) if name in TARGETS}
    modules["lora_te_proj"] = model.cond_stage_model.proj
    tensors = {}
    for key, module in modules.items():
        out, inp = module.weight.shape[:2]
        kernel = module.weight.shape[2:]
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, inp, *kernel, generator=g) * 0.3
        tensors[f"{key}.lora_up.weight"] = torch.randn(out, 4, *(1 for _ in kernel), generator=g) * 0.3
        tensors[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path))


@pytest.fixture
def host(tmp_path, monkeypatch):
    """The stand-in WebUI with a model, two LoRAs (char1, char2) in its LoRA folder and the host's loader."""
    model = _Model()
    with a1111_with(model, tmp_path, monkeypatch) as modules:
        for n in (1, 2):
            _write_lora(tmp_path / "Lora" / f"char{n}.safetensors", model, n)
        fake_networks.list_available_networks()
        yield model, modules, tmp_path / "Lora"


def _snapshot(model):
    return {name: p.detach().clone() for root in (model.model.diffusion_model, model.cond_stage_model)
            for name, p in root.state_dict().items()}


def _unchanged(model, before):
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    for root in (model.model.diffusion_model, model.cond_stage_model):
        assert not any(p.requires_grad and p.grad is not None for p in root.parameters())
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in root.modules())


REQUEST = dict(loras=["char1", "char2"], output="both", triggers=["zorb man", "quix woman"], method="least squares",
               size=64, record_steps=2)


@pytest.mark.parametrize("method", ["least squares", "distil"])
def test_a_merge_writes_a_lora_the_host_loads_and_leaves_the_model_bitwise_as_it_was(host, method):
    model, modules, folder = host
    before = _snapshot(model)
    seen = []
    result = merge_ui.run_as_job(merge_host.MergeRequest(**{**REQUEST, "method": method, "distil_steps": 3}),
                                 lambda text, done: seen.append(text))
    _unchanged(model, before)
    assert ("distilling: step 3 of 3" in seen) == (method == "distil") and result["method"] == method
    assert result["lora"] == "both" and result["layers"] == 4 and result["triggers"] == ["zorb man", "quix woman"]
    assert "both" in fake_networks.available_networks  # the list was read again
    net = fake_networks.load_network("both", fake_networks.available_networks["both"])
    assert len(net.modules) == 4  # every merged layer found by the host's loader
    for module in net.modules.values():
        delta, _ = module.calc_updown(module.sd_module.weight)
        assert torch.isfinite(delta).all() and delta.abs().sum() > 0
    assert modules.shared.state.job == ""  # the job ended


def test_a_merge_over_the_api_takes_json_and_names_a_bad_setting(host):
    with pytest.raises(OmgUserError, match="unknown merge setting 'rank'"):
        merge_host.MergeRequest.from_json({**REQUEST, "rank": 4})
    with pytest.raises(OmgUserError, match="bad merge request"):
        merge_host.MergeRequest.from_json({**REQUEST, "steps": "many"})
    assert merge_host.MergeRequest.from_json(REQUEST).loras == ["char1", "char2"]


@pytest.mark.parametrize("change, message", [
    (dict(loras=["char1"]), "a merge takes 2 to 12 LoRAs"),
    (dict(loras=["char1", "nobody"]), "LoRA 'nobody' is not in the WebUI's LoRA list"),
    (dict(output="char1"), "a LoRA named 'char1' already exists"),
    (dict(output="../escape"), "must be letters, digits"),
    (dict(method="average"), "merge method must be one of"),
])
def test_bad_input_is_named_and_changes_nothing(host, change, message):
    model, _, folder = host
    before, files = _snapshot(model), sorted(p.name for p in folder.iterdir())
    with pytest.raises(OmgUserError, match=message):
        merge_ui.run_as_job(merge_host.MergeRequest(**{**REQUEST, **change}))
    _unchanged(model, before)
    assert sorted(p.name for p in folder.iterdir()) == files


def test_a_damaged_lora_file_is_named_and_left_where_it_is(host):
    model, _, folder = host
    data = (folder / "char2.safetensors").read_bytes()
    (folder / "char2.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(OmgUserError, match="char2.safetensors is truncated"):
        merge_ui.run_as_job(merge_host.MergeRequest(**REQUEST))
    assert (folder / "char2.safetensors").read_bytes() == data[:len(data) // 2]
    assert not (folder / "both.safetensors").exists()


@pytest.mark.parametrize("phase, method", [("recording", "least squares"), ("fitting", "least squares"), ("distilling", "distil")])
def test_an_interrupt_in_any_phase_writes_nothing_and_leaves_the_model_as_it_was(host, monkeypatch, phase, method):
    model, modules, folder = host
    before = _snapshot(model)

    def progress(text, done):
        if text.startswith(phase):
            modules.shared.state.interrupt()

    with pytest.raises(OmgUserError, match="interrupted; nothing was written"):
        merge_ui.run_as_job(merge_host.MergeRequest(**{**REQUEST, "method": method, "distil_steps": 5}), progress)
    _unchanged(model, before)
    assert not (folder / "both.safetensors").exists() and not list(folder.glob("*.partial"))
