"""Concepts extracted from one rendered toy-world picture with ``omg_ext.concepts``, and pictures made with them.

The toy model is handed to the extraction loop as a ``ConceptModel`` (its text encoder takes embeddings as the
WebUIs' do); a source picture is a rendered two-figure scene whose true figure masks the renderer gives. The
extracted concepts go through their files (embedding and kohya LoRA, read back) into OMG's concept rows: the
concept prompt names the embedding ("a xzorb man at the beach"), the LoRA is the concept's LoRA.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from omg_ext.concepts.extract import Extraction, extract, phrase
from omg_ext.concepts.files import read_embedding, write_embedding, write_concept_lora
from omg_ext.concepts.model import ConceptModel
from omg_ext.concepts.settings import ExtractConcept, ExtractSettings
from omg_ext.engine.session import Concept

from .lora_files import read_kohya, target_layers
from .methods import Case, Generated, ToyWorld, omg
from .model import SCHEDULE, ToyModel, to_images, to_latent
from .scenes import BACKGROUNDS, CLASSES, IDENTITIES, Figure, Scene, render
from .text import VOCAB, word_positions


def concept_model(model: ToyModel) -> ConceptModel:
    """The toy model as the extraction loop takes a host's; the LoRA option trains the UNet's LoCon layers."""
    table = model.text.text_model.embeddings.token_embedding.weight

    def init_vectors(text: str, n: int) -> torch.Tensor:
        """Like A1111's: the init text's token embeddings cycled over the vectors (an unknown word: their mean)."""
        ids = [VOCAB.index(w) for w in text.lower().split() if w in VOCAB]
        rows = table[ids] if ids else table.mean(0, keepdim=True)
        return torch.stack([rows[i * len(rows) // n] for i in range(n)])

    return ConceptModel(
        unet=model.unet, predict=lambda x, t, c: model.unet(x, t.float(), context=c),
        encode=lambda prompts, embeddings: model.encode(prompts, embeddings)["context"],
        positions=word_positions, init_vectors=init_vectors, alphas_cumprod=SCHEDULE.alphas_cumprod,
        lora_layers={k: m for k, (part, _, m) in target_layers(model).items() if part == "unet"})


def source_scene(identities: tuple[int, ...], seed: int) -> Scene:
    """A picture of the identities side by side or overlapping (every other seed), on a background drawn by the seed."""
    rng = np.random.default_rng([77, seed])
    background = list(BACKGROUNDS)[seed % len(BACKGROUNDS)]
    xs = (0.3, 0.7) if seed % 2 == 0 else (0.4, 0.6)
    figures = [Figure(IDENTITIES[k - 1].figure, x * 24 + rng.uniform(-1, 1), rng.uniform(1, 4), rng.uniform(17, 20), k)
               for k, x in zip(identities, xs)]
    return Scene(background, figures)


def source_picture(scene: Scene) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent [1, 3, 24, 24] of a rendered scene and the true visible masks [concepts, 24, 24] of its figures."""
    image, kinds, _ = render(scene, rng=np.random.default_rng(5))
    truth = torch.stack([torch.from_numpy(kinds == CLASSES.index(f.kind) + 1) for f in scene.figures]).float()
    return to_latent(torch.from_numpy(image)[None]), truth


def names(identities: tuple[int, ...]) -> list[str]:
    """Embedding names the toy vocabulary lacks: "xzorb", "xquix"."""
    return [f"x{IDENTITIES[k - 1].trigger}" for k in identities]


def extract_from(world: ToyWorld, scene: Scene, settings: ExtractSettings, drawn: torch.Tensor | None = None) -> Extraction:
    """Both figures of ``scene`` as concepts (named by ``names``), optionally with drawn masks [concepts, H, W]."""
    latent, _ = source_picture(scene)
    concepts = [ExtractConcept(name, f.kind, [drawn[j]] if drawn is not None else [])
                for j, (name, f) in enumerate(zip(names(tuple(f.look for f in scene.figures)), scene.figures))]
    return extract(concept_model(world.model), latent, concepts, settings)


def iou(masks: torch.Tensor, truth: torch.Tensor) -> list[float]:
    """Per concept, the IoU of a 0/1 mask [concepts, H, W] with its true mask."""
    out = []
    for m, t in zip(masks > 0.5, truth > 0.5):
        union = int((m | t).sum())
        out.append(int((m & t).sum()) / union if union else 1.0)
    return out


class ExtractedConcepts:
    """An extraction written as files and read back as OMG's concepts: embeddings, and LoRAs when trained."""

    def __init__(self, world: ToyWorld, extraction: Extraction, classes: list[str]) -> None:
        self.world, self.classes = world, classes
        self.names = list(extraction.vectors)
        with tempfile.TemporaryDirectory() as folder:
            self.embeddings, self.loras = {}, {}
            for name, vectors in extraction.vectors.items():
                path = Path(folder) / f"{name}.safetensors"
                write_embedding(path, vectors, {"source": "toyworld"})
                self.embeddings[name] = read_embedding(path)
            for name, tensors in extraction.loras.items():
                path = Path(folder) / f"{name}-lora.safetensors"
                write_concept_lora(path, tensors, name, {"source": "toyworld"})
                self.loras[name] = read_kohya(path, world.model)

    def encode(self, prompt: str) -> dict:
        with torch.no_grad():
            return self.world.model.encode([prompt], self.embeddings)

    def concept_prompt(self, j: int, background: str) -> str:
        return f"{phrase(ExtractConcept(self.names[j], self.classes[j]))} {background}"

    def omg_concepts(self, case: Case) -> list[Concept]:
        """OMG's concept rows: the concept prompt with the embedding, the concept's LoRA (none without the option)."""
        prompt = case.prompt()
        return [Concept(self.encode(self.concept_prompt(j, case.background)), self.encode(""),
                        self.loras[name]["unet"] if name in self.loras else {}, word_positions(prompt, self.classes[j]))
                for j, name in enumerate(self.names)]

    def alone(self, j: int, background: str, seeds: list[int]) -> Generated:
        """Concept j alone in a new prompt ("a xzorb man at the beach"), its LoRA on every row."""
        from omg_ext.engine.lora import RowRoutedLoRA

        deltas = [self.loras[self.names[j]]["unet"]] if self.names[j] in self.loras else [{}]
        router = RowRoutedLoRA(dict(self.world.model.unet.named_modules()), deltas)
        cond, uncond = self.encode(self.concept_prompt(j, background)), self.encode("")
        with router.installed(), router.route([(0, 0, None)], batch=None):
            return Generated(to_images(self.world.sample(cond, uncond, seeds)))


def omg_extracted(world: ToyWorld, extracted: ExtractedConcepts, case: Case, seeds: list[int]) -> Generated:
    """OMG (this project's defaults) with the extracted concepts in the concept rows."""
    return omg(world, case, seeds, concepts=extracted.omg_concepts(case))

