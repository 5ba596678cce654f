"""Bad LoRA files are named before a host opens them, and nothing in the folder is touched."""
import pytest
import torch
from safetensors.torch import save_file

from omg_ext.lora_file import BadLoraFile, check_lora_file, lora_layer_count


def _lora(path, **extra):
    g = torch.Generator().manual_seed(0)
    tensors = {"lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.randn(320, 4, generator=g),
               "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.randn(4, 320, generator=g),
               "lora_unet_input_blocks_1_1_proj_in.alpha": torch.tensor(4.0)}
    save_file({**tensors, **extra}, str(path))
    return path


def _listing(folder):
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())


def _cut(path, fraction=None, size=None):
    data = path.read_bytes()
    path.write_bytes(data[:size if size is not None else int(len(data) * fraction)])
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: _cut(_lora(d / "char1.safetensors"), 0.5), r"^char1.safetensors is truncated: 5\d{3} bytes of 10\d{3} bytes — download it again$"),
    (lambda d: _cut(_lora(d / "char1.safetensors"), size=60), r"^char1.safetensors is truncated: 60 bytes of \d+ bytes — download it again$"),
    (lambda d: _cut(_lora(d / "char1.safetensors"), size=5), r"^char1.safetensors is not a readable safetensors file \(.*header too small\) — download it again$"),
    (lambda d: (d / "char1.safetensors").write_bytes(b"<html>Too many requests</html>") and d / "char1.safetensors",
     r"^char1.safetensors is not a readable safetensors file \(.*\) — download it again$"),
    (lambda d: save_file({"model.diffusion_model.out.weight": torch.zeros(2)}, str(d / "char1.safetensors")) or d / "char1.safetensors",
     r"^char1.safetensors holds no LoRA weights \(1 tensors, none a LoRA's\): is it a checkpoint, a VAE or an embedding\?$"),
    (lambda d: d / "gone.safetensors", r"^gone.safetensors is missing from .*: refresh the LoRA list$"),
])
def test_a_bad_file_is_named_and_the_folder_is_left_as_it_was(tmp_path, make, message):
    path = make(tmp_path)
    before = _listing(tmp_path)
    with pytest.raises(BadLoraFile, match=message):
        check_lora_file(path)
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("extra", [
    {},
    {"lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_a": torch.zeros(2, 2)},  # a LoHa key alone would do
])
def test_good_files_pass(tmp_path, extra):
    check_lora_file(_lora(tmp_path / "ok.safetensors", **extra))
    save_file({"lora_unet_out_0.diff": torch.zeros(2)}, str(tmp_path / "diff.safetensors"))
    check_lora_file(tmp_path / "diff.safetensors")
    (tmp_path / "old.pt").write_bytes(b"a pickle: the host's loader judges it")
    check_lora_file(tmp_path / "old.pt")


def test_the_layers_a_file_names_are_counted_once_each_whatever_its_format(tmp_path):
    z = torch.zeros(2, 2)
    keys = {"lora_unet_a.lora_up.weight": z, "lora_unet_a.lora_down.weight": z, "lora_unet_a.alpha": torch.tensor(1.0),  # kohya LoRA
            "lora_unet_b.hada_w1_a": z, "lora_unet_b.hada_w1_b": z, "lora_unet_b.hada_w2_a": z,  # LoHa
            "lora_unet_c.diff": z, "lora_unet_c.diff_b": torch.zeros(2),  # full difference, weight and bias
            "unet.down.0.to_k.lora_A.weight": z, "unet.down.0.to_k.lora_B.weight": z,  # PEFT / diffusers
            "lora_te_d.lora_up.weight": z, "lora_te_d.lora_down.weight": z, "lora_te_d.dora_scale": z,  # DoRA
            "bundle_emb.hero.string_to_param.*": z}  # a bundled embedding: not a layer
    save_file({k: v.clone() for k, v in keys.items()}, str(tmp_path / "mixed.safetensors"))
    assert lora_layer_count(tmp_path / "mixed.safetensors") == 5
    (tmp_path / "old.pt").write_bytes(b"a pickle")
    assert lora_layer_count(tmp_path / "old.pt") is None
