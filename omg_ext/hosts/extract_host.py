"""Extracting concepts on the WebUI's loaded model: the host side of ``omg_ext.concepts``, shared by A1111
(``extract_a1111``) and the Forge family (``extract_forge``), which each say how to reach their model.

The loop sees the host's model through a ``ConceptModel``: the pictures encoded by the host's own VAE path
(``images_tensor_to_samples``), prompts encoded by the host's text encoder with the concepts' vectors lent to
its textual-inversion database for the call (the way A1111's own embedding training feeds its vectors in),
the raw UNet. Nothing of the model is written: the lent embeddings are taken back (the database's
dictionaries restored as they were) after every call, also on an error or an Interrupt. The files go to the
host's embeddings and LoRA folders, never over an existing file, and both lists are read again.
"""
from __future__ import annotations

import contextlib
import inspect
import time
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from ..concepts.extract import Extraction, extract, phrase
from ..concepts.files import write_concept_lora, write_embedding
from ..concepts.model import ConceptModel
from .a1111 import class_word_tokens
from .errors import OmgUserError
from .extract_request import ExtractRequest
from .loras import host_networks, refresh_loras

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors", ".png", ".webp")
UNET_BLOCKS = ("input_blocks", "middle_block", "output_blocks")


class LentEmbedding:
    """An embedding as the hosts' databases and prompt code read one (A1111's and Forge's ``Embedding``): one
    tensor, or SDXL's ``{"clip_l": …, "clip_g": …}`` that each text encoder takes its part of."""

    def __init__(self, vec: torch.Tensor | dict[str, torch.Tensor], name: str) -> None:
        parts = list(vec.values()) if isinstance(vec, dict) else [vec]
        self.vec, self.name, self.vectors, self.shape = vec, name, parts[0].shape[0], sum(p.shape[-1] for p in parts)
        self.step = self.sd_checkpoint = self.sd_checkpoint_name = self.filename = None
        self.hash = self.shorthash = self.cached_checksum = None


@contextlib.contextmanager
def lent_embeddings(db, sd_model, vectors: dict[str, torch.Tensor | dict]) -> Iterator[None]:
    """``vectors`` registered in the host's embedding database ``db`` for the scope; its dictionaries exactly as
    they were afterwards (A1111's ``register_embedding`` takes the model, Forge's does not)."""
    words, lookup = dict(db.word_embeddings), {k: list(v) for k, v in db.ids_lookup.items()}
    takes_model = len(inspect.signature(db.register_embedding).parameters) > 1
    try:
        for name, vec in vectors.items():
            embedding = LentEmbedding(vec, name)
            db.register_embedding(embedding, sd_model) if takes_model else db.register_embedding(embedding)
        yield
    finally:
        db.word_embeddings.clear()
        db.word_embeddings.update(words)
        db.ids_lookup.clear()
        db.ids_lookup.update(lookup)


def embedding_tokens(clip, prompt: str, name: str) -> list[int]:
    """The positions of embedding ``name``'s vectors in the conditioning of ``prompt`` (77 tokens a chunk)."""
    chunks, _ = clip.tokenize_line(prompt)
    return [c * len(chunk.tokens) + fix.offset + 1 + k for c, chunk in enumerate(chunks) for fix in chunk.fixes
            if fix.embedding.name == name for k in range(int(fix.embedding.vectors))]


def token_positions(clip, prompt: str, word: str, vectors: dict) -> list[int]:
    """A concept's vectors' positions (``word`` an embedding's name) or a class word's, with the vectors lent."""
    return embedding_tokens(clip, prompt, word) if word in vectors else class_word_tokens(clip, prompt, word)


def cycled(embedded: torch.Tensor, n: int, text: str) -> torch.Tensor:
    """As A1111's "Create embedding" starts one: the init text's token embeddings cycled over ``n`` vectors."""
    if embedded.shape[0] == 0:
        raise OmgUserError(f"the class word {text!r} has no tokens")
    return torch.stack([embedded[i * embedded.shape[0] // n] for i in range(n)]).float()


def joined(embedded: list[torch.Tensor]) -> torch.Tensor:
    """Each text encoder's token embeddings of an init text side by side, over the tokens they all have (A1111's
    CLIP-L lookup keeps at most the vectors asked for, its CLIP-G lookup every token)."""
    tokens = min(e.shape[0] for e in embedded)
    return torch.cat([e[:tokens] for e in embedded], 1)


def lora_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Kohya key -> layer for the LoRA option: the UNet blocks' linear and convolution layers (LoCon's set), keyed
    by their ldm names, which both hosts' LoRA loaders map."""
    return {"lora_unet_" + name.replace(".", "_"): m for name, m in unet.named_modules()
            if name.startswith(UNET_BLOCKS) and getattr(m, "weight", None) is not None and m.weight.dim() in (2, 4)
            and not any(True for _ in m.children())}


def sdxl_conditioning(cond_l: torch.Tensor, cond_g: torch.Tensor, pooled: torch.Tensor, reference: dict) -> dict:
    """SDXL's conditioning from its two text encoders' outputs, differentiable in them: ``crossattn`` CLIP-L's and
    CLIP-G's tokens side by side, ``vector`` CLIP-G's pooled output then the size embeddings, taken from
    ``reference`` (the host's own conditioning of the same prompts, whose size part no vector changes)."""
    vector = reference["vector"].detach().clone().to(pooled)
    return {"crossattn": torch.cat([cond_l, cond_g.to(cond_l)], 2), "vector": torch.cat([pooled, vector[:, pooled.shape[-1]:]], 1)}


def sdxl_encode(sd_model, encoders: list, prompts: list[str], size: tuple[int, int]) -> dict:
    """``sdxl_conditioning`` of ``prompts`` by the host's CLIP-L and CLIP-G encoders (CLIP-G's giving its pooled
    output too), the size part from the host's own conditioning at the pictures' ``size`` (width, height)."""
    from modules import prompt_parser

    cond_l, (cond_g, pooled) = encoders[0](prompts), encoders[1](prompts)
    with torch.no_grad():
        reference = sd_model.get_learned_conditioning(prompt_parser.SdConditioning(prompts, width=size[0], height=size[1]))
    return sdxl_conditioning(cond_l, cond_g, pooled, reference)


def lent_positions(lent, encoder):
    """``ConceptModel.positions`` with the vectors lent by ``lent`` (a context of a name -> vectors dict) and the
    tokens of ``encoder`` (CLIP-L's with SDXL)."""
    def positions(prompt: str, word: str, vectors: dict) -> list[int]:
        with lent({k: v.detach() for k, v in vectors.items()}):
            return token_positions(encoder, prompt, word, vectors)

    return positions


def sdxl_parts(width_l: int, width_g: int) -> dict[str, int]:
    return {"clip_l": width_l, "clip_g": width_g}


def unet_conditioning(context, dtype: torch.dtype) -> dict:
    """The raw UNet's keyword arguments for an encoded context: SD1.5's tensor, or SDXL's ``crossattn`` and ``vector`` (``y``)."""
    if isinstance(context, dict):
        return {"context": context["crossattn"].to(dtype), "y": context["vector"].to(dtype)}
    return {"context": context.to(dtype)}


class ExtractHost(Protocol):
    def loaded_model(self): ...
    def concept_model(self, sd_model, size: tuple[int, int]) -> ConceptModel: ...
    def loaded_embeddings(self) -> set[str]: ...
    def reload_embeddings(self) -> None: ...


def output_paths(host: ExtractHost, names: list[str], lora: bool) -> tuple[list[Path], list[Path]]:
    """The embedding (and LoRA) files to write; a name in use by an embedding or LoRA is refused."""
    from modules import shared

    embeddings_dir, lora_dir = Path(shared.cmd_opts.embeddings_dir), Path(shared.cmd_opts.lora_dir)
    loaded = {w.lower() for w in host.loaded_embeddings()}
    for name in names:
        taken = [p for p in (embeddings_dir / f"{name}{s}" for s in EMBEDDING_SUFFIXES) if p.exists()]
        if taken or name.lower() in loaded:
            raise OmgUserError(f"an embedding named {name!r} already exists ({taken[0] if taken else 'loaded'}): choose another name")
        if lora and ((lora_dir / f"{name}.safetensors").exists() or name in host_networks().available_networks):
            raise OmgUserError(f"a LoRA named {name!r} already exists in {lora_dir}: choose another name")
    return [embeddings_dir / f"{n}.safetensors" for n in names], [lora_dir / f"{n}.safetensors" for n in names] if lora else []


def encode_pictures(sd_model, pictures: list) -> torch.Tensor:
    """The pictures' latents by the host's own VAE path, as a plain float tensor (not one made in inference mode)."""
    from modules import devices, sd_samplers_common

    pixels = torch.from_numpy(np.stack([np.asarray(p, dtype=np.float32) / 255 for p in pictures])).permute(0, 3, 1, 2)
    with torch.no_grad():
        return sd_samplers_common.images_tensor_to_samples(pixels.to(devices.device), None, sd_model).float().clone()


def run_extract(host: ExtractHost, request: ExtractRequest, progress=lambda text, done: None, check=lambda: None
                ) -> tuple[dict, Extraction]:
    """Extract the concepts on the loaded model into the embeddings (and LoRA) folders: (what was written, the
    extraction with every round's masks). ``check`` raises to stop (the Interrupt) before each step."""
    started = time.perf_counter()
    sd_model = host.loaded_model()
    pictures = request.pictures()
    settings = request.extract_settings()
    concepts = request.extract_concepts(pictures[0].size)
    embedding_files, lora_files = output_paths(host, [c.name for c in concepts], settings.lora)
    model = host.concept_model(sd_model, pictures[0].size)
    latents = encode_pictures(sd_model, pictures)
    with torch.enable_grad():
        extraction = extract(model, latents, concepts, settings, progress, check)
    info = request.info(pictures, settings)
    written = []
    for c, path in zip(concepts, embedding_files):
        write_embedding(path, model.embedding(extraction.vectors[c.name]), {**info, "name": c.name, "class_word": c.class_word})
        written.append(str(path))
    for c, path in zip(concepts, lora_files):
        write_concept_lora(path, extraction.loras[c.name], c.name, {**info, "name": c.name})
        written.append(str(path))
    host.reload_embeddings()
    if lora_files:
        refresh_loras()
    return {"embeddings": [c.name for c in concepts], "loras": [c.name for c in concepts] if lora_files else [],
            "files": written, "concept_prompts": [phrase(c) for c in concepts],
            "class_words": [c.class_word.strip() for c in concepts],
            "rounds": [{"round": r, "loss": None if x.loss is None else round(x.loss, 5),
                        "mask_share": [round(float(m), 4) for m in x.masks.mean((0, 2, 3))]} for r, x in enumerate(extraction.rounds)],
            "seconds": round(time.perf_counter() - started, 1)}, extraction
