import numpy as np
from PIL import Image


def sample_to_image(samples, index=0, approximation=None):
    x = samples[index, :3].float().clamp(-1, 1).add(1).mul(127.5).permute(1, 2, 0).numpy().astype(np.uint8)
    return Image.fromarray(x)
