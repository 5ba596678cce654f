"""Rebuild every committed toy-world weight file from a fixed seed.

    python -m toyworld.train all        # base model, identity LoRAs, scorer (about an hour on 2 cores)
    python -m toyworld.train base       # or one part: base | loras | scorer
    python -m toyworld.train loras --preset attention --out DIR   # attention-only LoRAs elsewhere (merging)
    python -m toyworld.train loras --regularised --out toyworld/weights/regularised   # the LoRAs merging uses

Training runs on the CPU with a progress bar (to stderr, or the log file you redirect it
to) and writes a resumable checkpoint every ``CHECKPOINT_EVERY`` steps under
``toyworld/checkpoints/`` (not committed): a stopped run picks up where it was. The
finished weights go to ``toyworld/weights/`` in fp16.

- base: the ldm-shaped UNet and the text encoder together, noise prediction on scenes of
  plain figures with their prompts; prompts dropped 10 % of the time (classifier-free
  guidance); the exponential moving average of the weights is what is saved.
- loras: one file per identity, trained as a civitai user trains one: the base frozen, a
  trigger word, single-figure images of the identity only. Kohya LoRA (LoCon on convs)
  for three identities, LoHa for the fourth. With ``--regularised`` half of every batch is
  class regularisation images (kohya's ``reg_data_dir``: plain figures, prompts without a
  trigger), so the LoRA must leave "a man" as the base draws it and the identity answers to
  its trigger word alone: what merging needs (docs/merge.md).
- scorer: the per-pixel classifier the measures use, on rendered scenes with ground truth.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .lora_files import PRESETS, TrainableAdapter
from .model import SCHEDULE, WEIGHTS, ToyModel, to_latent
from .scenes import IDENTITIES, random_scene, render
from .scorer import Scorer, augment, scorer_batch, scorer_loss

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
CHECKPOINT_EVERY = 250
SEED = 1234


def batch_of_scenes(rng: np.random.Generator, size: int, looks=(), trigger_prompts: bool = True):
    """Images [B, 3, H, W] in [-1, 1] and their prompts."""
    images, prompts = [], []
    for _ in range(size):
        scene = random_scene(rng, looks=looks)
        image, _, _ = render(scene, rng=rng)
        images.append(torch.from_numpy(image))
        prompts.append(scene.prompt(trigger_prompts))
    return to_latent(torch.stack(images)), prompts


OFFSET_NOISE = 0.15
"""Per image and channel, a constant added to the noise (offset noise). At 24×24, SD's last
timestep leaves so much signal in an image's mean colour (an SNR near 1 over 576 pixels)
that a model learns to read the background from the noise rather than the prompt, and
at sampling the seed picks the background; the offset hides the mean colour."""


def diffusion_loss(model: ToyModel, x0: torch.Tensor, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
    """Noise-prediction MSE at uniformly drawn timesteps, with offset noise."""
    t = torch.randint(0, 1000, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    noise = noise + OFFSET_NOISE * torch.randn(*x0.shape[:2], 1, 1, generator=generator)
    a = SCHEDULE.alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return F.mse_loss(model.unet(xt, t.float(), context=model.text(prompts)), noise)


class Checkpointed:
    """A training loop that saves its whole state every ``CHECKPOINT_EVERY`` steps and resumes."""

    def __init__(self, name: str, steps: int, params: list, lr: float, ema: torch.nn.Module | None = None):
        self.name, self.steps, self.lr = name, steps, lr
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.ema_source, self.ema = ema, copy.deepcopy(ema) if ema is not None else None
        self.path = CHECKPOINTS / f"{name}.pt"

    def _lr(self, step: int) -> float:
        warmup = min(200, self.steps // 10)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (self.steps - warmup))))

    def run(self, loss_at: Callable[[int], torch.Tensor], state_of: Callable[[], dict], load_state: Callable[[dict], None]) -> None:
        start = 0
        if self.path.exists():
            saved = torch.load(self.path, weights_only=True)
            load_state(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            if self.ema is not None:
                self.ema.load_state_dict(saved["ema"])
            start = saved["step"]
        bar = tqdm(range(start, self.steps), initial=start, total=self.steps, desc=self.name, file=sys.stderr,
                   mininterval=10, ascii=True)
        running = None
        for step in bar:
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr(step)
            loss = loss_at(step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            if self.ema is not None:
                with torch.no_grad():
                    decay = min(0.999, (1 + step) / (10 + step))
                    for e, p in zip(self.ema.parameters(), self.ema_source.parameters()):
                        e.lerp_(p, 1 - decay)
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.set_postfix(loss=f"{running:.4f}", refresh=False)
            if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == self.steps:
                CHECKPOINTS.mkdir(exist_ok=True)
                saved = {"model": state_of(), "optimizer": self.optimizer.state_dict(), "step": step + 1}
                if self.ema is not None:
                    saved["ema"] = self.ema.state_dict()
                torch.save(saved, self.path.with_suffix(".tmp"))
                self.path.with_suffix(".tmp").replace(self.path)


def train_base(steps: int = 5000, batch: int = 48) -> None:
    torch.manual_seed(SEED)
    model = ToyModel(seed=SEED).train()
    generator = torch.Generator().manual_seed(SEED)

    def loss_at(step: int) -> torch.Tensor:
        rng = np.random.default_rng([SEED, step])
        x0, prompts = batch_of_scenes(rng, batch)
        prompts = ["" if rng.random() < 0.1 else p for p in prompts]
        return diffusion_loss(model, x0, prompts, generator)

    loop = Checkpointed("base", steps, list(model.parameters()), lr=1e-3, ema=model)
    loop.run(loss_at, model.state_dict, model.load_state_dict)
    WEIGHTS.mkdir(exist_ok=True)
    loop.ema.save(WEIGHTS / "base.safetensors")


LORA_KINDS = ("lora", "lora", "lora", "loha")
"""One kind per identity (``IDENTITIES`` order): three kohya LoRAs (LoCon) and a LoHa."""


def train_lora(k: int, steps: int = 600, batch: int = 32, preset: str = "all", out: Path = WEIGHTS,
               regularised: bool = False) -> None:
    """Identity ``k`` (1-based) as a civitai user trains it: frozen base, trigger word, one figure per image;
    ``preset``: the layers it trains (``lora_files.PRESETS``), ``out``: the folder of the file,
    ``regularised``: half of each batch plain class scenes without the trigger."""
    identity = IDENTITIES[k - 1]
    base = ToyModel.load(WEIGHTS / "base.safetensors")
    adapter = TrainableAdapter(base, LORA_KINDS[k - 1], rank=4, alpha=4.0, seed=SEED + k, preset=preset)
    generator = torch.Generator().manual_seed(SEED + k)

    def loss_at(step: int) -> torch.Tensor:
        rng = np.random.default_rng([SEED, k, step])
        x0, prompts = batch_of_scenes(rng, batch // 2 if regularised else batch, looks=(k,))
        if regularised:
            plain, plain_prompts = batch_of_scenes(rng, batch - batch // 2)
            x0, prompts = torch.cat([x0, plain]), prompts + plain_prompts
        with adapter.installed():
            return diffusion_loss(base, x0, prompts, generator)

    name = f"lora_{identity.trigger}" + ("" if preset == "all" else f"_{preset}") + ("_regularised" if regularised else "")
    loop = Checkpointed(name, steps, list(adapter.parameters()), lr=2e-3)
    loop.run(loss_at, adapter.state_dict, adapter.load_state_dict)
    out.mkdir(parents=True, exist_ok=True)
    adapter.save(out / f"{identity.trigger}.safetensors", identity.trigger, identity.figure)


def train_loras(preset: str = "all", out: Path = WEIGHTS, regularised: bool = False) -> None:
    for k in range(1, len(IDENTITIES) + 1):
        train_lora(k, preset=preset, out=out, regularised=regularised)


def train_scorer(steps: int = 1500, batch: int = 64) -> None:
    torch.manual_seed(SEED)
    scorer = Scorer()
    generator = torch.Generator().manual_seed(SEED)

    def loss_at(step: int) -> torch.Tensor:
        images, kinds, looks = scorer_batch(np.random.default_rng([SEED, 99, step]), batch)
        return scorer_loss(scorer, augment(images, generator), kinds, looks)

    Checkpointed("scorer", steps, list(scorer.parameters()), lr=3e-3).run(loss_at, scorer.state_dict, scorer.load_state_dict)
    scorer.save(WEIGHTS / "scorer.safetensors")


PARTS = {"base": train_base, "loras": train_loras, "scorer": train_scorer}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=[*PARTS, "all"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preset", choices=PRESETS, default="all",
                        help="loras: the layers they train (attention: the UNet's attention projections and the text encoder)")
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="loras: the folder the files go to")
    parser.add_argument("--regularised", action="store_true",
                        help="loras: half of each batch plain class scenes without the trigger (the identity answers to its trigger)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.part == "loras":
        train_loras(args.preset, args.out, args.regularised)
        return
    for name in (PARTS if args.part == "all" else [args.part]):
        PARTS[name]()


if __name__ == "__main__":
    main()
