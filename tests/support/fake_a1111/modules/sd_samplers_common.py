import numpy as np
from PIL import Image


def sample_to_image(samples, index=0, approximation=None):
    x = samples[index, :3].float().clamp(-1, 1).add(1).mul(127.5).permute(1, 2, 0).numpy().astype(np.uint8)
    return Image.fromarray(x)


def images_tensor_to_samples(image, approximation=None, model=None):
    """image [B, 3, H, W] in [0, 1] -> latent: the stand-in model's VAE (``encode_first_stage``)."""
    return model.get_first_stage_encoding(model.encode_first_stage(image * 2 - 1))
