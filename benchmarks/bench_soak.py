"""Soak: 50 mixed OMG jobs in one process on the tiny UNet — does anything leak or stay patched?

    python benchmarks/bench_soak.py [--jobs 50] [--seed 0]

Each job draws (from a fixed seed): OMG on or off, k = 1–5 concepts, batch 1–2, a latent
size among 12×16, 16×12, 16×16, a hires pass (×1.5, blended) or not, a mask source that
works offline (attention; attention + a random-weight Segment Anything; detector + SAM
with a random-weight OWL-ViT; drawn regions), and a fault: none, an error at a random
UNet call, an interrupt at a random call (as a sampler raises it), or a GPU-style
out-of-memory error in pass 2 (calls halved). After every job the UNet must have the same
weights bit for bit and no patch left; the process's resident memory is read.

The mix runs twice with the same draws. The first round meets every shape for the first
time, and torch's CPU kernels (oneDNN) build and cache a primitive per new shape and batch:
its growth is printed as ``cold rss growth``. The second round is the measured one: the
same jobs, the caches full, so what grows now is what a job leaves behind. Prints, per 10
measured jobs, the highest resident memory after a job; then ``weights restored: N/100``
(both rounds) and last ``rss growth: X%`` (mean resident memory after the last 10 measured
jobs against the first 10; target ≤ 5 %). glibc is told to return freed blocks to the
system at once, so resident memory follows live memory, not the allocator's history.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # before torch allocates anything
    os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    os.execv(sys.executable, [sys.executable, *sys.argv])

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy  # noqa: E402
import torch  # noqa: E402

from minisd.torchvision_shim import ensure_torchvision_ops  # noqa: E402
ensure_torchvision_ops()
import torch.nn.functional as F  # noqa: E402

from omg_ext.engine.session import Concept, OmgSession  # noqa: E402
from omg_ext.masks import detector  # noqa: E402
from omg_ext.masks.regions import parse_regions  # noqa: E402
from omg_ext.masks.segment import segment  # noqa: E402
from omg_ext.masks.sources import MaskInputs, MaskModels, concept_masks  # noqa: E402
from minisd.loras import random_concept_deltas  # noqa: E402
from minisd.mask_models import tiny_owlvit, tiny_sam  # noqa: E402
from minisd.runs import SCHEDULE  # noqa: E402
from minisd.sampling import generate  # noqa: E402
from minisd.unet import TinyUNet, unet_fn  # noqa: E402

CTX = 64
WORDS = ["man", "woman", "cat", "dog", "hat"]
SOURCES = ["attention", "attention+sam", "detector+sam", "regions"]
FAULTS = ["none", "none", "error", "interrupt", "out of memory"]
SIZES = [(12, 16), (16, 12), (16, 16)]


class Interrupted(Exception):
    """What a WebUI sampler raises when the user presses Interrupt."""


def _ctx(seed: int, rows: int = 1) -> torch.Tensor:
    return torch.randn(rows, 77, CTX, generator=torch.Generator().manual_seed(seed))


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _picture(latent: torch.Tensor) -> numpy.ndarray:
    """A layout picture (H×W×3 uint8) from a latent, as a host's fast preview would give."""
    rgb = F.interpolate(latent[None, :3], scale_factor=8, mode="nearest")[0]
    return ((rgb.clamp(-2, 2) + 2) * 63.75).byte().permute(1, 2, 0).numpy()


def _regions(k: int, hw: tuple[int, int]) -> str:
    width, height = hw[1] * 8, hw[0] * 8
    step = width // k
    return json.dumps({"width": width, "height": height,
                       "boxes": {str(j + 1): [j * step, 0, (j + 1) * step, height] for j in range(k)}})


class Soak:
    def __init__(self, seed: int, folder: Path) -> None:
        self.rng = random.Random(seed)
        self.unet = TinyUNet(context_dim=CTX, seed=0)
        self.weights = {k: v.clone() for k, v in self.unet.state_dict().items()}
        self.concepts = [Concept({"context": _ctx(10 + j)}, {"context": _ctx(20 + j)},
                                 random_concept_deltas(self.unet, seed=j + 1), tokens=[4 + j]) for j in range(5)]
        sam = tiny_sam()
        processor, model = tiny_owlvit(folder)
        self.models = MaskModels(sam=lambda: (lambda image, prompts: segment(sam, image, prompts)),
                                 detector=lambda: detector.Detector("owlvit", processor, model))

    def job(self) -> dict:
        r = self.rng
        k, images, hw = r.randint(1, 5), r.randint(1, 2), r.choice(SIZES)
        spec = dict(omg=r.random() > 0.2, k=k, images=images, hw=hw, hires=r.random() < 0.3,
                    source=r.choice(SOURCES), fault=r.choice(FAULTS), fault_call=r.randint(1, 12))
        try:
            self.run(**spec)
            spec["outcome"] = "made"
        except (Interrupted, RuntimeError) as e:
            spec["outcome"] = type(e).__name__
        return spec

    def run(self, omg, k, images, hw, hires, source, fault, fault_call) -> None:
        raw, calls = unet_fn(self.unet), [0]
        cond, uncond = {"context": _ctx(1, images)}, {"context": _ctx(2, images)}

        def host_unet(x, t, c):
            calls[0] += 1
            if calls[0] == fault_call and fault in ("error", "interrupt"):
                raise (Interrupted("interrupted") if fault == "interrupt" else RuntimeError("injected failure"))
            if fault == "out of memory" and session is not None and session.mode == "pass2" and x.shape[0] > 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
            return raw(x, t, c)

        session = OmgSession(self.unet, self.concepts[:k], images=images) if omg else None
        model_fn = (lambda x, t, c, rows: session(host_unet, x, t, c, rows)) if omg else (lambda x, t, c, rows: host_unet(x, t, c))
        sample = dict(seed=0, steps=6, latent_shape=(images, 4, *hw))
        with torch.no_grad():
            if not omg:
                latent = generate(model_fn, SCHEDULE, "euler", cond, uncond, **sample)
                return self.hires(model_fn, cond, uncond, latent) if hires else None
            with session.installed():
                session.begin_pass1()
                layout = generate(model_fn, SCHEDULE, "euler", cond, uncond, **sample)
                maps = session.attention_maps()
                regions = parse_regions(_regions(k, hw), k) if source == "regions" else None
                masks = torch.stack([concept_masks(source, MaskInputs(
                    maps[i], hw, WORDS[:k], _picture(layout[i]), regions=regions), self.models).masks for i in range(images)])
                session.begin_pass2(masks, blend_start=0.3)
                latent = generate(model_fn, SCHEDULE, "euler", cond, uncond, **sample)
                if hires:
                    session.begin_hires(blend=True)
                    self.hires(model_fn, cond, uncond, latent)

    @staticmethod
    def hires(model_fn, cond, uncond, latent):
        upscaled = F.interpolate(latent, scale_factor=1.5, mode="nearest")
        return generate(model_fn, SCHEDULE, "euler", cond, uncond, seed=1, steps=4, latent_shape=tuple(upscaled.shape))

    def restored(self) -> bool:
        now = self.unet.state_dict()
        clean = all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__
                    for m in self.unet.modules())
        return clean and all(torch.equal(now[k], v) for k, v in self.weights.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        soak = Soak(args.seed, Path(folder))
        restored, outcomes, rounds = 0, {}, []
        for measured in (False, True):
            soak.rng, rss = random.Random(args.seed), []
            print("measured round:" if measured else "first round (caches filling):")
            for n in range(1, args.jobs + 1):
                spec = soak.job()
                restored += soak.restored()
                rss.append(_rss())
                outcomes[spec["outcome"]] = outcomes.get(spec["outcome"], 0) + 1
                print(f"job {n:2d}: {'OMG k=' + str(spec['k']) if spec['omg'] else 'plain':8} batch {spec['images']} "
                      f"{spec['hw'][0]}x{spec['hw'][1]}{' +hires' if spec['hires'] else '':7} {spec['source']:14} "
                      f"fault: {spec['fault']:13} -> {spec['outcome']:12} rss {rss[-1] / 2**20:.1f} MB", flush=True)
                if measured and n % 10 == 0:
                    print(f"jobs {n - 9}-{n}: peak RSS after a job {max(rss[-10:]) / 2**20:.1f} MB")
            rounds.append(100 * (sum(rss[-10:]) / sum(rss[:10]) - 1))
    print("outcomes (both rounds): " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    print(f"cold rss growth (first round): {rounds[0]:.1f}%")
    print(f"weights restored: {restored}/{2 * args.jobs}")
    print(f"rss growth: {rounds[1]:.1f}%")


if __name__ == "__main__":
    main()
