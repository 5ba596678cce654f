"""The Forge family's model for an extraction: the checkpoint's own UNet patcher (``forge_objects_original``: no
LoRA of an earlier job patched in) loaded by the host's memory manager, its raw UNet with OMG's attention
patches in the transformer options while the E-step captures, and the text encoder through Forge's
``text_processing_engine`` and its embedding database (Classic and reForge keep A1111's).

Forge builds its models in inference mode, and autograd cannot keep an inference tensor for the backward
pass; while the M-step runs, each layer whose weights are such tensors computes with plain copies of them
(made in its forward, dropped after the backward pass), and the activations autograd keeps are copies, since
Forge's UNet adds to some in place: the weights themselves are never touched (``trainable``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..concepts.model import ConceptModel
from ..engine.attention import AttentionState, ProjectedAttention
from .extract_host import cycled, lent_embeddings, lora_layers, token_positions
from .forge_attention import FORGE_BLOCKS, attention_modules_by_block
from .forge_backend import forge_backend


@contextlib.contextmanager
def trainable(module: torch.nn.Module) -> Iterator[None]:
    """The module made fit for a backward pass for the scope, without touching its weights:

    - every layer holding inference-mode parameters or buffers (Forge's loader makes them so; CLIP's position ids
      among them) computes with plain copies of them while gradients are recorded;
    - every activation autograd keeps is kept as a copy: Forge's UNet adds to tensors in place (``x += n``)
      after a layer saved them, which autograd refuses; the weights (and their copies) are kept as they are.
    """
    handles, weights = [], {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}

    def held(m) -> list[dict]:
        return [m._parameters, m._buffers]

    def swap_in(m, _inputs):
        if torch.is_grad_enabled():
            m._omg_saved = [dict(d) for d in held(m)]
            for d in held(m):
                for name, t in d.items():
                    if t is not None and t.is_inference():
                        d[name] = t.clone()
                        weights.add(d[name].untyped_storage().data_ptr())

    def swap_out(m, *_):
        saved = m.__dict__.pop("_omg_saved", None)
        if saved is not None:
            for d, kept in zip(held(m), saved):
                d.update(kept)

    def pack(t: torch.Tensor) -> torch.Tensor:
        return t if t.untyped_storage().data_ptr() in weights else t.clone()

    try:
        for m in module.modules():
            if any(t is not None and t.is_inference() for d in held(m) for t in d.values()):
                handles += [m.register_forward_pre_hook(swap_in), m.register_forward_hook(swap_out)]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
    finally:
        for handle in handles:
            handle.remove()
        for m in module.modules():
            swap_out(m)


def text_side(sd_model):
    """(prompt encoder, its embedding database, what loads it on the device): Forge's engine, or A1111's
    ``cond_stage_model`` and hijack in Classic and reForge."""
    engine = getattr(sd_model, "text_processing_engine", None)
    if engine is not None:
        return engine, engine.embeddings, sd_model.forge_objects.clip.patcher
    from modules import sd_hijack

    return sd_model.cond_stage_model, sd_hijack.model_hijack.embedding_db, None


def alphas_cumprod(sd_model, unet_patcher) -> torch.Tensor:
    found = getattr(sd_model, "alphas_cumprod", None)
    if found is None:
        found = unet_patcher.model.predictor.alphas_cumprod
    return found.float().cpu()


class ForgeExtract:
    def __init__(self, app=None) -> None:
        """``app``: the WebUI's FastAPI app, whose ``/sdapi/v1/embeddings`` lists from a database of its own."""
        self.backend, self.app = forge_backend(), app

    def concept_model(self, sd_model) -> ConceptModel:
        objects = getattr(sd_model, "forge_objects_original", None) or sd_model.forge_objects
        unet_patcher = objects.unet
        self.backend.load_patcher(unet_patcher)
        unet = unet_patcher.model.diffusion_model
        encoder, db, clip_patcher = text_side(sd_model)
        state = AttentionState()
        capture = ProjectedAttention(state, True, self.backend.attention(), attention_modules_by_block(unet))
        patches: dict = {}

        def encode(prompts: list[str], vectors: dict) -> torch.Tensor:
            if clip_patcher is not None:
                self.backend.load_patcher(clip_patcher)
            with lent_embeddings(db, sd_model, vectors), trainable(encoder_module(encoder)), kept_infotext():
                return encoder(prompts)

        def positions(prompt: str, word: str, vectors: dict) -> list[int]:
            with lent_embeddings(db, sd_model, {k: v.detach() for k, v in vectors.items()}):
                return token_positions(encoder, prompt, word, vectors)

        def init_vectors(text: str, n: int) -> torch.Tensor:
            if clip_patcher is not None:
                self.backend.load_patcher(clip_patcher)
            ids = encoder.tokenize([text])[0][:n]
            table = encoder_module(encoder).transformer.text_model.embeddings.token_embedding
            table = getattr(table, "wrapped", table)
            with torch.no_grad():
                return cycled(table(torch.tensor([ids], device=table.weight.device))[0].float(), n, text)

        def predict(x, t, context):
            self.backend.load_patcher(unet_patcher)
            dtype = getattr(unet_patcher.model, "computation_dtype", None) or next(unet.parameters()).dtype
            options = {"patches_replace": patches} if patches else {}
            with trainable(unet):
                return unet(x.to(dtype), t, context=context.to(dtype), transformer_options=options).float()

        @contextlib.contextmanager
        def attention() -> Iterator[AttentionState]:
            patches["attn2"] = dict.fromkeys(FORGE_BLOCKS, capture)
            try:
                yield state
            finally:
                patches.clear()

        return ConceptModel(unet=unet, predict=predict, encode=encode, positions=positions, init_vectors=init_vectors,
                            alphas_cumprod=alphas_cumprod(sd_model, unet_patcher), lora_layers=lora_layers(unet),
                            attention=attention)

    def loaded_embeddings(self) -> set[str]:
        from modules import shared

        return set(text_side(shared.sd_model)[1].word_embeddings)

    def reload_embeddings(self) -> None:
        """Every database that lists embeddings: the text engine's (what prompts use) and the API's."""
        from modules import shared

        db = text_side(shared.sd_model)[1]
        db.load_textual_inversion_embeddings()
        api = api_embedding_db(self.app)
        if api is not None and api is not db:
            api.load_textual_inversion_embeddings(force_reload=True, sync_with_sd_model=False)


def api_embedding_db(app):
    """The database behind the app's ``/sdapi/v1/embeddings`` (the ``Api`` object its endpoint is bound to)."""
    for route in getattr(app, "routes", []):
        if getattr(route, "path", "") == "/sdapi/v1/embeddings":
            return getattr(getattr(route.endpoint, "__self__", None), "embedding_db", None)
    return None


def encoder_module(encoder) -> torch.nn.Module:
    """The text encoder's module tree: Forge's engine keeps it as ``text_encoder``; A1111's wrapper as ``wrapped``."""
    return getattr(encoder, "text_encoder", None) or getattr(encoder, "wrapped", encoder)


@contextlib.contextmanager
def kept_infotext() -> Iterator[None]:
    """Forge's engine notes each embedding it encodes for the next picture's infotext ("TI: …"); the lent ones
    must not be noted."""
    try:
        from backend.text_processing import classic_engine
    except ImportError:
        yield
        return
    saved = dict(classic_engine.last_extra_generation_params)
    try:
        yield
    finally:
        classic_engine.last_extra_generation_params.clear()
        classic_engine.last_extra_generation_params.update(saved)
