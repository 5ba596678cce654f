"""The toy world's identity LoRAs merged into one file with ``omg_ext.merge``, and pictures made with it.

A concept's inputs are recorded as a user's merge on a WebUI records them: its LoRA active on the text
encoder and the UNet (the engine's row-routed hooks: no weight changes), its trigger prompts encoded, and a
few Euler steps sampled from them at CFG (the uncond rows run with the LoRA too, as they do when a user loads it).
"""
from __future__ import annotations

from pathlib import Path

import torch

from omg_ext.engine.lora import DenseDelta, RowRoutedLoRA
from omg_ext.merge.distil import Teaching
from omg_ext.merge.merge import MergeConcept, MergeSettings, merge, to_file
from omg_ext.merge.record import recording
from minisd.sampling import generate

from .lora_files import read_kohya, target_layers, text_router
from .methods import CFG, STEPS, Generated, ToyWorld, _rows
from .measures import ConceptLook, image_measures
from .model import SCHEDULE, WEIGHTS, to_images
from .scenes import BACKGROUNDS, IDENTITIES, SIZE, Figure, Scene, scene_prompt

RECORD_STEPS, RECORD_SEEDS = 20, tuple(range(7, 15))
REGULARISED = WEIGHTS / "regularised"
"""The identity LoRAs trained with class regularisation images (``python -m toyworld.train loras --regularised``):
each answers to its trigger word alone, what merging needs; also the tests' 4-identity merge."""


def trigger_prompts(identity: int, trigger: bool = True) -> list[str]:
    """The identity alone on every background, as its LoRA was trained ("a zorb man on grass"); without its
    trigger word: "a man on grass"."""
    figure = Figure(IDENTITIES[identity - 1].figure, 0, 0, 0, identity)
    return [scene_prompt(Scene(background, [figure]), trigger) for background in BACKGROUNDS]


def layer_modules(world: ToyWorld) -> dict[str, torch.nn.Module]:
    return {key: module for key, (_, _, module) in target_layers(world.model).items()}


def merge_concepts(world: ToyWorld, identities: tuple[int, ...]) -> list[MergeConcept]:
    """Each identity's file as dense per-layer deltas under its kohya keys."""
    keys = {(part, name): key for key, (part, name, _) in target_layers(world.model).items()}
    concepts = []
    for k in identities:
        deltas = world.lora(k)
        dense = {keys[part, name]: delta.dense() for part in ("unet", "text") for name, delta in deltas[part].items()}
        concepts.append(MergeConcept(IDENTITIES[k - 1].trigger, IDENTITIES[k - 1].trigger, dense, source=str(world.files[k])))
    return concepts


def sample_with(world: ToyWorld, deltas: dict, prompts: list[str], seeds: list[int], steps: int) -> torch.Tensor:
    """Latents of ``prompts`` (one per seed, cycled) sampled with ``deltas`` (``{"unet", "text"}``) on every row."""
    text = text_router(world.model, [deltas["text"]])
    unet = RowRoutedLoRA(dict(world.model.unet.named_modules()), [deltas["unet"]])
    with text.installed(), text.route([(0, 0, None)], batch=None), unet.installed(), unet.route([(0, 0, None)], batch=None):
        conds = [world.model.encode([prompts[i % len(prompts)]]) for i in range(len(seeds))]
        cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
        uncond = _rows(world.model.encode([""]), len(seeds))
        raw = world.model.unet_fn()
        return generate(lambda x, t, c, rows: raw(x, t, c), SCHEDULE, "euler", cond, uncond, seed=0, steps=steps,
                        latent_shape=(len(seeds), 3, SIZE, SIZE), cfg_scale=CFG, seeds=seeds)


@torch.no_grad()
def merged_file(world: ToyWorld, identities: tuple[int, ...], path: Path, settings: MergeSettings) -> dict[str, float]:
    """Merge the identities' files into ``path``; returns each layer's relative SVD error."""
    layers, concepts = layer_modules(world), merge_concepts(world, identities)

    pictures = {}

    def record(j: int, keys: list[str]):
        with recording({key: layers[key] for key in keys}, settings.rows, seed=j) as samples:
            pictures[j] = sample_with(world, world.lora(identities[j]), trigger_prompts(identities[j]), list(RECORD_SEEDS),
                                      RECORD_STEPS)
        return samples

    with torch.enable_grad():  # loraclr's fit optimises; the recording above runs without gradients
        merged = merge(layers, concepts, record, settings,
                       teach=lambda text: teaching(world, identities, [pictures[j] for j in range(len(identities))], text))
    return to_file(path, merged, layers, concepts, settings)


def teaching(world: ToyWorld, identities: tuple[int, ...], pictures: list[torch.Tensor], text: dict[str, torch.Tensor]) -> Teaching:
    """Distillation's view of the toy world: each identity's recorded pictures, their prompts encoded with its own
    text LoRA (teacher) and with the merged text layers ``text`` (student)."""
    unet = dict(world.model.unet.named_modules())
    merged_text = text_router(world.model, [kohya_deltas(world, text)["text"]])
    own, merged = [], []
    for j, k in enumerate(identities):
        prompts = trigger_prompts(k)
        rows = [prompts[i % len(prompts)] for i in range(len(RECORD_SEEDS))]
        own_text = text_router(world.model, [world.lora(k)["text"]])
        with torch.no_grad():
            for router, out in ((own_text, own), (merged_text, merged)):
                with router.installed(), router.route([(0, 0, None)], batch=None):
                    out.append(world.model.encode(rows)["context"])

    def teacher(j: int, index: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        router = RowRoutedLoRA(unet, [world.lora(identities[j])["unet"]])
        with router.installed(), router.route([(0, 0, None)], batch=None):
            return world.model.unet(x_t, t.float(), context=own[j][index])

    def student(j: int, index: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return world.model.unet(x_t, t.float(), context=merged[j][index])

    return Teaching(pictures, teacher, student, SCHEDULE.alphas_cumprod)


def kohya_deltas(world: ToyWorld, deltas: dict[str, torch.Tensor]) -> dict:
    """Dense deltas by kohya key as ``{"unet", "text"}`` deltas by module name (what the routers take)."""
    out: dict = {"unet": {}, "text": {}}
    for key, (part, name, _) in target_layers(world.model).items():
        if key in deltas:
            out[part][name] = DenseDelta(deltas[key])
    return out


class MergedWorld(ToyWorld):
    """The toy world in which every identity's LoRA is the merged file: OMG with the merged file as each concept's LoRA."""

    def __init__(self, world: ToyWorld, path: Path) -> None:
        self.__dict__.update(world.__dict__)
        self.merged = read_kohya(path, world.model)

    def lora(self, identity: int, weight: float = 1.0) -> dict:
        if weight != 1.0:
            raise ValueError("the merged file is used at weight 1")
        return self.merged


@torch.no_grad()
def with_lora(world: ToyWorld, deltas: dict, prompt: str, seeds: list[int]) -> Generated:
    """Pictures of ``prompt`` with one LoRA (``{"unet", "text"}`` deltas) on the whole model, as a WebUI loads it."""
    return Generated(to_images(sample_with(world, deltas, [prompt], seeds, STEPS)))


def merged_name(identities: tuple[int, ...], method: str) -> str:
    """The file name of a merge: ``merged_zorb_quix_plok_vann_distil.safetensors``."""
    return "merged_" + "_".join(IDENTITIES[k - 1].trigger for k in identities) + f"_{method.replace(' ', '_')}.safetensors"


def single_fidelity(world: ToyWorld, deltas: dict, identity: int, seeds: list[int],
                    trigger: bool = True) -> tuple[float, torch.Tensor]:
    """Mean fidelity of the identity's single-figure prompts with ``deltas`` (``trigger=False``: the prompts without its
    trigger word, "a man on grass"); the pictures of the first prompt."""
    values, first = [], None
    for prompt in trigger_prompts(identity, trigger):
        images = with_lora(world, deltas, prompt, seeds).images
        first = images if first is None else first
        kinds, looks = world.scorer.labels(images)
        values += [image_measures(kinds[b], looks[b], [ConceptLook(identity)])["fidelity"] for b in range(len(seeds))]
    return sum(values) / len(values), first
