"""Merging LoRAs on the Forge stand-in: each LoRA parsed by Forge's own loader into patches, the checkpoint's own
patchers used, weights built in inference mode left bitwise as they were (after success and Interrupt), and the
merged file read back by Forge's loader giving the merged deltas."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from omg_ext.hosts import merge_host, merge_ui
from omg_ext.hosts.errors import OmgUserError
from omg_ext.hosts.forge_backend import ForgeBackend
from omg_ext.hosts.forge_lora import dense_difference
from omg_ext.hosts.merge_forge import ForgeMerge, kohya_names
from tests.hosts.test_extract_forge import host  # noqa: F401 - the Forge stand-in's fixture
from tests.support.fake_a1111 import networks as fake_networks

LAYERS = ("input_blocks.1.1.transformer_blocks.0.attn2.to_k", "input_blocks.1.1.proj_in", "input_blocks.1.0.in_layers.2")


def _write_lora(path, model, seed):
    """A kohya file: plain LoRA on a cross-attention k, a 1×1 conv and a 3×3 ResBlock conv, and the text encoder's proj."""
    g = torch.Generator().manual_seed(seed)
    unet = model.forge_objects.unet.model.diffusion_model
    targets = {"lora_unet_" + name.replace(".", "_"): unet.get_submodule(name) for name in LAYERS}
    targets["lora_te_proj"] = model.text_processing_engine.proj
    tensors = {}
    for key, module in targets.items():
        out, inp, *kernel = module.weight.shape
        tensors[f"{key}.lora_down.weight"] = torch.randn(2, inp, *kernel, generator=g) * 0.3
        tensors[f"{key}.lora_up.weight"] = torch.randn(out, 2, *(1 for _ in kernel), generator=g) * 0.3
        tensors[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path))


@pytest.fixture
def forge(host, monkeypatch):  # noqa: F811 - uses the imported fixture
    model, modules, folder, _ = host
    monkeypatch.setattr(fake_networks, "load_lora_state_dict", lambda filename: load_file(filename), raising=False)
    for n in (1, 2):
        _write_lora(folder / "Lora" / f"char{n}.safetensors", model, n)
    fake_networks.list_available_networks()
    return model, modules, folder / "Lora"


def _weights(model):
    return {n: p.clone() for root in (model.forge_objects.unet.model, model.text_processing_engine)
            for n, p in root.state_dict().items()}


def _deltas(path, model) -> dict:
    """Parameter name -> the dense delta Forge's loader and merge make of a LoRA file."""
    backend, objects = ForgeBackend(), model.forge_objects_original
    unet, clip = backend.lora_patches(load_file(str(path)), objects)
    params = {**dict(objects.unet.model.named_parameters()), **dict(objects.clip.cond_stage_model.named_parameters())}
    return {k: dense_difference(params[k], patch, lambda p, base, key: backend.merge(objects, p, base, 1.0, key), k)
            for k, patch in {**unet, **clip}.items()}


REQUEST = dict(loras=["char1", "char2"], output="both", triggers=["zorb man", "quix woman"], size=64, record_steps=2)


def test_a_sum_merge_read_back_by_forges_loader_is_the_sum_of_the_loras_and_the_model_is_unchanged(forge):
    model, modules, folder = forge
    before = _weights(model)
    result = merge_ui.run_as_job(merge_host.MergeRequest(**REQUEST, method="sum", energy=1.0))
    after = _weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.is_inference() for p in model.forge_objects.unet.model.parameters())  # the very tensors
    for root in (model.forge_objects.unet.model, model.text_processing_engine):
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in root.modules())
    assert result["layers"] == 4 and result["largest relative error"] < 1e-6
    assert "both" in fake_networks.available_networks
    merged, one, two = (_deltas(folder / f"{n}.safetensors", model) for n in ("both", "char1", "char2"))
    assert sorted(merged) == sorted(one) and len(merged) == 4  # every layer mapped back by Forge's loader
    for key in merged:
        expected = one[key] + two[key]
        assert (merged[key] - expected).norm() <= 2e-3 * expected.norm(), key  # fp16 factors


def test_a_distil_merge_on_forge_trains_through_its_model_and_leaves_it_bitwise_as_it_was(forge):
    model, _, folder = forge
    before = _weights(model)
    seen = []
    result = merge_ui.run_as_job(merge_host.MergeRequest(**REQUEST, method="distil", distil_steps=2), lambda t, d: seen.append(t))
    after = _weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "distilling: step 2 of 2" in seen and result["layers"] == 4
    merged = _deltas(folder / "both.safetensors", model)
    assert len(merged) == 4 and all(torch.isfinite(d).all() for d in merged.values())


def test_a_least_squares_merge_on_forge_differs_from_the_sum(forge):
    model, _, folder = forge
    merge_ui.run_as_job(merge_host.MergeRequest(**REQUEST, method="least squares", energy=1.0))
    merged, one, two = (_deltas(folder / f"{n}.safetensors", model) for n in ("both", "char1", "char2"))
    key = "diffusion_model." + LAYERS[2] + ".weight"
    assert (merged[key] - one[key] - two[key]).norm() > 0.05 * (one[key] + two[key]).norm()


def test_an_interrupt_of_a_merge_on_forge_writes_nothing(forge):
    model, modules, folder = forge
    before = _weights(model)

    def progress(text, done):
        if text.startswith("fitting"):
            modules.shared.state.interrupt()

    with pytest.raises(OmgUserError, match="interrupted; nothing was written"):
        merge_ui.run_as_job(merge_host.MergeRequest(**REQUEST), progress)
    after = _weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in folder.iterdir()) == ["char1.safetensors", "char2.safetensors"]


def test_a_quantised_checkpoint_is_refused_with_a_message(forge, monkeypatch):
    model, *_ = forge
    proj = model.text_processing_engine.proj
    monkeypatch.setattr(proj.weight, "gguf_cls", object(), raising=False)
    with pytest.raises(OmgUserError, match="weights in fp16 or fp32"):
        ForgeMerge().lora_layers(model, "char1")


def test_a_text_encoder_weight_the_host_names_no_lora_key_for_is_refused_with_a_message(forge, monkeypatch):
    model, *_ = forge
    """A host whose key map gives the text encoder's weights no ``lora_…`` name (only other spellings)."""
    monkeypatch.setattr("omg_ext.hosts.merge_forge.kohya_names", lambda key_map: {})
    with pytest.raises(OmgUserError, match="names no LoRA key for"):
        ForgeMerge().lora_layers(model, "char1")


def test_text_encoder_layers_get_the_kohya_name_a1111_maps_too():
    key_map = {"lora_te1_text_model_encoder_layers_0_mlp_fc1": "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
               "text_encoder.text_model.encoder.layers.0.mlp.fc1": "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
               "lora_te_text_model_encoder_layers_0_mlp_fc1": "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
               ("lora_unet_x", 0): "diffusion_model.x.weight"}
    assert kohya_names(key_map) == {"clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight":
                                    "lora_te_text_model_encoder_layers_0_mlp_fc1"}


def test_a_merge_after_a_job_with_a_lora_encodes_with_the_checkpoints_own_text_encoder(forge):
    """Forge keeps the last job's LoRA written into the shared weights (its patchers in ``forge_objects``); the
    merge loads the checkpoint's own patchers, which takes it out, before its text encoder records anything."""
    model, _, folder = forge
    clean = model.text_processing_engine.proj.weight.clone()
    job = model.forge_objects.shallow_copy()
    job.clip = job.clip.clone()
    _, clip_patches = ForgeBackend().lora_patches(load_file(str(folder / "char1.safetensors")), job)
    ForgeBackend().add_clip_patches(job.clip, clip_patches, "char1", 1.0)
    model.forge_objects = job
    from backend import memory_management

    memory_management.load_model_gpu(job.clip.patcher)  # what the job's encoding left in the weights
    assert not torch.equal(model.text_processing_engine.proj.weight, clean)
    seen = []
    hook = model.text_processing_engine.proj.register_forward_pre_hook(lambda m, _: seen.append(torch.equal(m.weight, clean)))
    try:
        merge_ui.run_as_job(merge_host.MergeRequest(**REQUEST, method="sum"))
    finally:
        hook.remove()
    assert seen and all(seen)
