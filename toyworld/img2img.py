"""img2img in the toy world: init pictures drawn by the scene generator (plain figures where the case puts
its two characters, the true figure masks known), and each way of putting the identities into them.

- ``img2img``: the prompt alone (no LoRA): what the picture becomes without the characters;
- ``global LoRAs``: both LoRAs on the whole model, both trigger words in the prompt (what users do today);
- ``OMG``: two passes, both img2img from the init picture, masks from pass 1's attention;
- ``OMG init masks``: the same with masks from the init picture through the toy detector and segmenter
  (``detector+sam`` on the init image: what SAM or a detector do on a real picture in the WebUIs).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .methods import Case, Generated, Img2Img, Settings, ToyWorld, global_loras, omg
from .model import to_images
from .scenes import SIZE, Scene, random_figure, render


def init_pictures(case: Case, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per seed a rendered scene of the case's background with a plain man and a plain woman (overlapping,
    the woman in front, in the occlusion cases): (pictures as the model's input [B, 3, H, W] in [-1, 1], true
    figure classes [B, H, W]: 0 background, 1 man, 2 woman)."""
    pictures, kinds = [], []
    for seed in seeds:
        rng = np.random.default_rng([seed, 40])
        figures = [random_figure(rng, "man"), random_figure(rng, "woman")]
        if case.in_front:
            figures[1].x = float(np.clip(figures[0].x + rng.uniform(-0.2, 0.2) * SIZE, 0.15 * SIZE, 0.85 * SIZE))
        image, kind, _ = render(Scene(case.background, figures, case.in_front), rng=rng)
        pictures.append(torch.from_numpy(image))
        kinds.append(torch.from_numpy(kind))
    return torch.stack(pictures).permute(0, 3, 1, 2) * 2 - 1, torch.stack(kinds)


def plain(world: ToyWorld, case: Case, seeds: list[int], init: Img2Img) -> Generated:
    return Generated(to_images(world.sample(world.encode(case.prompt()), world.encode(""), seeds, init)))


METHODS: dict[str, Callable[[ToyWorld, Case, list[int], Img2Img], Generated]] = {
    "img2img": plain,
    "global LoRAs": lambda w, c, s, init: global_loras(w, c, s, init=init),
    "OMG": lambda w, c, s, init: omg(w, c, s, init=init),
    "OMG init masks": lambda w, c, s, init: omg(w, c, s, Settings(masks="grounded init"), init=init),
}
