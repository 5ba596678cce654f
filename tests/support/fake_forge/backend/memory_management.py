"""``load_model_gpu(patcher)``: Forge loads a patcher by merging its LoRA patches (``LoadedModel.model_load``)."""
loaded = []


def load_model_gpu(patcher):
    loaded.append(patcher)
    patcher.refresh_loras()
