"""Toy-world LoRA files: what training adds is exactly what the engine routes after a round trip through kohya format."""
import json

import pytest
import torch
from safetensors import safe_open

from omg_ext.engine.lora import RowRoutedLoRA
from toyworld.lora_files import TrainableAdapter, read_kohya, text_router
from toyworld.model import ToyModel


@pytest.fixture(scope="module")
def model():
    return ToyModel(seed=3).eval().requires_grad_(False)


def _randomised(adapter: TrainableAdapter) -> TrainableAdapter:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in adapter.factors.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return adapter


@pytest.mark.parametrize("kind", ["lora", "loha"])
@torch.no_grad()
def test_a_saved_file_routes_like_the_trained_adapter(model, kind, tmp_path):
    adapter = _randomised(TrainableAdapter(model, kind, rank=4, alpha=2.0))
    path = tmp_path / f"{kind}.safetensors"
    adapter.save(path, "zorb", "man")
    # fp16 on disk: compare against the adapter with its factors rounded the same way
    with torch.no_grad():
        for p in adapter.factors.values():
            p.copy_(p.half().float())
    x = torch.randn(2, 3, 24, 20, generator=torch.Generator().manual_seed(1))  # non-square
    t = torch.tensor([500.0, 30.0])
    cond = model.encode(["a zorb man on grass", "a man at night"])
    plain = model.unet(x, t, context=cond["context"])
    with adapter.installed():
        trained_cond = model.encode(["a zorb man on grass", "a man at night"])
        trained = model.unet(x, t, context=trained_cond["context"])
    deltas = read_kohya(path, model)
    assert set(deltas["unet"]) and set(deltas["text"])
    router = text_router(model, [deltas["text"]])
    with router.installed(), router.route_all(0):
        routed_cond = model.encode(["a zorb man on grass", "a man at night"])
    torch.testing.assert_close(routed_cond["context"], trained_cond["context"], rtol=1e-4, atol=1e-4)
    unet_router = RowRoutedLoRA(dict(model.unet.named_modules()), [deltas["unet"]])
    with unet_router.installed(), unet_router.route([(0, 0, 2)], batch=2):
        routed = model.unet(x, t, context=trained_cond["context"])
    assert (trained - plain).abs().max() > 1e-2, "the adapter must matter"
    torch.testing.assert_close(routed, trained, rtol=1e-4, atol=1e-4)


def test_file_has_kohya_keys_and_trigger_metadata(model, tmp_path):
    path = tmp_path / "z.safetensors"
    TrainableAdapter(model, "lora").save(path, "zorb", "man")
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_q.lora_down.weight" in keys
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight" in keys  # LoCon: ResBlock convs
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert json.loads(meta["ss_tag_frequency"]) == {"10_zorb man": {"zorb": 100, "man": 100}}


def test_a_foreign_key_is_named(model, tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_label_emb_0_0.lora_up.weight": torch.zeros(4, 4),
               "lora_unet_label_emb_0_0.lora_down.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(ValueError, match="sdxl.safetensors: lora_unet_label_emb_0_0 is not a layer of the toy model"):
        read_kohya(path, model)


def test_the_attention_preset_trains_the_unets_attention_projections_and_the_text_encoder(model):
    from toyworld.lora_files import target_layers

    every, attention = target_layers(model), target_layers(model, "attention")
    assert set(attention) < set(every)
    assert {k for k, (part, _, _) in attention.items() if part == "text"} == {k for k, (part, _, _) in every.items() if part == "text"}
    unet = [name for part, name, _ in attention.values() if part == "unet"]
    assert unet and all(".attn1." in name or ".attn2." in name for name in unet)
    assert len(unet) < len([1 for part, _, _ in every.values() if part == "unet"])
    assert set(TrainableAdapter(model, preset="attention").layers) == set(attention)
    with pytest.raises(ValueError, match="preset must be one of"):
        target_layers(model, "convs")
