"""Extracting concepts on the WebUI's loaded model (A1111 v1.10): the host side of ``omg_ext.concepts``.

The loop sees the host's model through a ``ConceptModel``: the pictures encoded by the host's own VAE path
(``images_tensor_to_samples``), prompts encoded by the host's text encoder with the concepts' vectors lent to
its textual-inversion database for the call (the way A1111's own embedding training feeds its vectors in), the
raw UNet under the host's autocast. Nothing of the model is written: the lent embeddings are taken back (the
database's dictionaries restored as they were) after every call, also on an error or an Interrupt. The files go
to the host's embeddings and LoRA folders, never over an existing file, and both lists are read again.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

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


def embedding_db():
    from modules import sd_hijack

    return sd_hijack.model_hijack.embedding_db


@contextlib.contextmanager
def lent_embeddings(sd_model, vectors: dict[str, torch.Tensor]) -> Iterator[None]:
    """``vectors`` registered as embeddings for the scope; the database exactly as it was afterwards."""
    from modules.textual_inversion.textual_inversion import Embedding

    db = embedding_db()
    words, lookup = dict(db.word_embeddings), {k: list(v) for k, v in db.ids_lookup.items()}
    try:
        for name, vec in vectors.items():
            embedding = Embedding(vec, name)
            embedding.vectors, embedding.shape = vec.shape[0], vec.shape[-1]
            db.register_embedding(embedding, sd_model)
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


def concept_model(sd_model) -> ConceptModel:
    from modules import devices

    clip, unet = sd_model.cond_stage_model, sd_model.model.diffusion_model

    def encode(prompts: list[str], vectors: dict) -> torch.Tensor:
        with lent_embeddings(sd_model, vectors), devices.autocast():
            return clip(prompts)

    def positions(prompt: str, word: str, vectors: dict) -> list[int]:
        with lent_embeddings(sd_model, {k: v.detach() for k, v in vectors.items()}):
            return embedding_tokens(clip, prompt, word) if word in vectors else class_word_tokens(clip, prompt, word)

    def init_vectors(text: str, n: int) -> torch.Tensor:
        """As A1111's "Create embedding" starts one: the init text's token embeddings cycled over the vectors."""
        with devices.autocast():
            embedded = clip.encode_embedding_init_text(text, n).float()
        if embedded.shape[0] == 0:
            raise OmgUserError(f"the class word {text!r} has no tokens")
        return torch.stack([embedded[i * embedded.shape[0] // n] for i in range(n)])

    def predict(x, t, context):
        with devices.autocast():
            return unet(x.to(devices.dtype_unet), t, context=context.to(devices.dtype_unet)).float()

    layers = {"lora_unet_" + name.replace(".", "_"): m for name, m in unet.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name.startswith(("input_blocks", "middle_block", "output_blocks"))}
    return ConceptModel(unet=unet, predict=predict, encode=encode, positions=positions, init_vectors=init_vectors,
                        alphas_cumprod=sd_model.alphas_cumprod.float().cpu(), lora_layers=layers)


def output_paths(names: list[str], lora: bool) -> tuple[list[Path], list[Path]]:
    """The embedding (and LoRA) files to write; a name in use by an embedding or LoRA is refused."""
    from modules import shared

    embeddings_dir, lora_dir = Path(shared.cmd_opts.embeddings_dir), Path(shared.cmd_opts.lora_dir)
    loaded = {w.lower() for w in embedding_db().word_embeddings}
    for name in names:
        taken = [p for p in (embeddings_dir / f"{name}{s}" for s in EMBEDDING_SUFFIXES) if p.exists()]
        if taken or name.lower() in loaded:
            raise OmgUserError(f"an embedding named {name!r} already exists ({taken[0] if taken else 'loaded'}): choose another name")
        if lora and ((lora_dir / f"{name}.safetensors").exists() or name in host_networks().available_networks):
            raise OmgUserError(f"a LoRA named {name!r} already exists in {lora_dir}: choose another name")
    return [embeddings_dir / f"{n}.safetensors" for n in names], [lora_dir / f"{n}.safetensors" for n in names] if lora else []


def encode_pictures(sd_model, pictures: list) -> torch.Tensor:
    from modules import devices, sd_samplers_common

    pixels = torch.from_numpy(np.stack([np.asarray(p, dtype=np.float32) / 255 for p in pictures])).permute(0, 3, 1, 2)
    with torch.no_grad(), devices.autocast():
        return sd_samplers_common.images_tensor_to_samples(pixels.to(devices.device), None, sd_model).float()


def run_extract(request: ExtractRequest, progress=lambda text, done: None, check=lambda: None) -> tuple[dict, Extraction]:
    """Extract the concepts on the loaded model into the embeddings (and LoRA) folders: (what was written, the
    extraction with every round's masks). ``check`` raises to stop (the Interrupt) before each step."""
    from modules import shared

    started = time.perf_counter()
    sd_model = shared.sd_model
    if getattr(sd_model, "is_sdxl", False):
        raise OmgUserError("extracting concepts with SDXL is not supported yet: load an SD1.5 checkpoint")
    pictures = request.pictures()
    settings = request.extract_settings()
    concepts = request.extract_concepts(pictures[0].size)
    embedding_files, lora_files = output_paths([c.name for c in concepts], settings.lora)
    latents = encode_pictures(sd_model, pictures)
    with torch.enable_grad():
        extraction = extract(concept_model(sd_model), latents, concepts, settings, progress, check)
    info = request.info(pictures, settings)
    written = []
    for c, path in zip(concepts, embedding_files):
        write_embedding(path, extraction.vectors[c.name], {**info, "name": c.name, "class_word": c.class_word})
        written.append(str(path))
    for c, path in zip(concepts, lora_files):
        write_concept_lora(path, extraction.loras[c.name], c.name, {**info, "name": c.name})
        written.append(str(path))
    embedding_db().load_textual_inversion_embeddings(force_reload=True)
    if lora_files:
        refresh_loras()
    return {"embeddings": [c.name for c in concepts], "loras": [c.name for c in concepts] if lora_files else [],
            "files": written, "concept_prompts": [phrase(c) for c in concepts],
            "class_words": [c.class_word.strip() for c in concepts],
            "rounds": [{"round": r, "loss": None if x.loss is None else round(x.loss, 5),
                        "mask_share": [round(float(m), 4) for m in x.masks.mean((0, 2, 3))]} for r, x in enumerate(extraction.rounds)],
            "seconds": round(time.perf_counter() - started, 1)}, extraction
