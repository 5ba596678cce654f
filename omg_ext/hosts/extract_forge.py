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
from typing import Callable, Iterator

import torch

from ..concepts.model import ConceptModel
from ..engine.attention import AttentionState, ProjectedAttention, attend_with_replacement
from ..concepts.files import embedding_vectors
from .errors import OmgUserError
from .extract_a1111 import a1111_text_side
from .extract_host import cycled, joined, lent_embeddings, lent_positions, lora_layers, sdxl_encode, sdxl_parts, unet_conditioning
from .forge_attention import FORGE_BLOCKS, attention_modules_by_block
from .forge_backend import forge_backend


@contextlib.contextmanager
def trainable(module: torch.nn.Module) -> Iterator[None]:
    """The module made fit for a backward pass for the scope, without touching its weights:

    - every layer holding inference-mode parameters or buffers (Forge's loader makes them so; CLIP's position ids
      among them) computes with plain copies of them while gradients are recorded; where autograd keeps such a
      copy for the backward pass it keeps the inference tensor instead and copies it again when the backward
      pass needs it, so one layer's copy lives at a time, not the whole model's (SDXL's UNet is 5 GB in fp16);
    - every other activation autograd keeps is kept as a copy: Forge's UNet adds to tensors in place (``x += n``)
      after a layer saved them, which autograd refuses; the module's own tensors are kept as they are.
    """
    handles, own = [], {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    copies: dict[int, torch.Tensor] = {}
    """A live copy's storage -> the inference tensor it copies (only while its layer runs: storage is reused)."""

    def held(m) -> list[dict]:
        return [m._parameters, m._buffers]

    def swap_in(m, _inputs):
        if torch.is_grad_enabled():
            m._omg_saved = [dict(d) for d in held(m)]
            for d in held(m):
                for name, t in d.items():
                    if t is not None and t.is_inference():
                        d[name] = t.clone()
                        copies[d[name].untyped_storage().data_ptr()] = t

    def swap_out(m, *_):
        saved = m.__dict__.pop("_omg_saved", None)
        if saved is not None:
            for d, kept in zip(held(m), saved):
                for name, t in d.items():
                    if t is not None and t is not kept[name]:
                        copies.pop(t.untyped_storage().data_ptr(), None)
                d.update(kept)

    def pack(t: torch.Tensor):
        original = copies.get(t.untyped_storage().data_ptr())
        if original is not None:  # (a view of) a layer's copy: copied again for the backward pass
            return original, t.size(), t.stride(), t.storage_offset()
        return t if t.untyped_storage().data_ptr() in own else t.clone()

    def unpack(packed) -> torch.Tensor:
        if isinstance(packed, tuple):
            original, size, stride, offset = packed
            return original.clone().as_strided(size, stride, offset)
        return packed

    try:
        for m in module.modules():
            if any(t is not None and t.is_inference() for d in held(m) for t in d.values()):
                handles += [m.register_forward_pre_hook(swap_in), m.register_forward_hook(swap_out)]
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        for handle in handles:
            handle.remove()
        for m in module.modules():
            swap_out(m)


def trainable_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """Attention as a replace patch autograd can go through (PyTorch's SDPA): Forge's sub-quadratic attention,
    its choice on CPUs and cards without PyTorch attention, exponentiates in place once little free memory
    makes it chunk, which a backward pass refuses."""
    heads = extra_options["n_heads"]
    return attend_with_replacement(q, k, v, heads, (q.shape[-1] // heads) ** -0.5, [])


TRAINABLE_ATTENTION = {"attn1": dict.fromkeys(FORGE_BLOCKS, trainable_attention), "attn2": dict.fromkeys(FORGE_BLOCKS, trainable_attention)}
"""The M-step's replace patches: every transformer block's self- and cross-attention through ``trainable_attention``."""


def forge_engines(sd_model) -> list:
    """Forge's text engines (CLIP-L's, then CLIP-G's for SDXL), each with its own embedding database; none in
    Classic and reForge, which keep A1111's hijack."""
    if getattr(sd_model, "is_sdxl", False) and hasattr(sd_model, "text_processing_engine_g"):
        if not hasattr(sd_model, "text_processing_engine_l"):
            raise OmgUserError("extracting concepts needs SDXL's two text encoders (CLIP-L and CLIP-G): the SDXL refiner has one; load a base SDXL checkpoint")
        return [sd_model.text_processing_engine_l, sd_model.text_processing_engine_g]
    engine = getattr(sd_model, "text_processing_engine", None)
    return [engine] if engine is not None else []


def engines_text_side(sd_model, size: tuple[int, int], engines: list, load: Callable[[], None]) -> dict:
    """``ConceptModel``'s text fields on Forge's engines: the vectors lent to every engine's database (split
    between CLIP-L and CLIP-G for SDXL), the encoders made trainable while encoding; ``load`` puts the text
    encoders on the device first."""
    sdxl = len(engines) == 2
    tables = [token_table(e) for e in engines]
    parts = sdxl_parts(*(t.weight.shape[-1] for t in tables)) if sdxl else None

    @contextlib.contextmanager
    def lent(vectors: dict) -> Iterator[None]:
        split = {k: embedding_vectors(v, parts) for k, v in vectors.items()}
        with contextlib.ExitStack() as stack:
            for engine in engines:
                stack.enter_context(lent_embeddings(engine.embeddings, sd_model, split))
            yield

    def encode(prompts: list[str], vectors: dict):
        load()
        with lent(vectors), kept_infotext(), contextlib.ExitStack() as stack:
            for engine in engines:
                stack.enter_context(trainable(encoder_module(engine)))
            if not sdxl:
                return engines[0](prompts)
            return sdxl_encode(sd_model, engines, prompts, size)

    def init_vectors(text: str, n: int) -> torch.Tensor:
        load()
        with torch.no_grad():
            embedded = [table(torch.tensor([e.tokenize([text])[0][:n]], device=table.weight.device))[0].float()
                        for e, table in zip(engines, tables)]
        return cycled(joined(embedded), n, text)

    return dict(encode=encode, positions=lent_positions(lent, engines[0]), init_vectors=init_vectors, parts=parts)


def token_table(engine) -> torch.nn.Module:
    """An engine's token embedding table (the lookup without the embeddings' substitution)."""
    table = encoder_module(engine).transformer.text_model.embeddings.token_embedding
    return getattr(table, "wrapped", table)


def alphas_cumprod(sd_model, unet_patcher) -> torch.Tensor:
    found = getattr(sd_model, "alphas_cumprod", None)
    if found is None:
        found = unet_patcher.model.predictor.alphas_cumprod
    return found.float().cpu()


class ForgeExtract:
    def __init__(self, app=None) -> None:
        """``app``: the WebUI's FastAPI app, whose ``/sdapi/v1/embeddings`` lists from a database of its own."""
        self.backend, self.app = forge_backend(), app

    def loaded_model(self):
        """The selected checkpoint, loaded: Forge loads it at the first job (``forge_model_reload``), and an
        extraction may be that job."""
        from modules import sd_models

        reload = getattr(sd_models, "forge_model_reload", None)
        if reload is not None:
            reload()
        return current_model()

    def concept_model(self, sd_model, size: tuple[int, int] = (512, 512)) -> ConceptModel:
        """``size``: the pictures' (width, height), what SDXL's size conditioning says."""
        objects = original_objects(sd_model)
        unet_patcher = objects.unet
        self.backend.load_patcher(unet_patcher)
        unet = unet_patcher.model.diffusion_model
        state = AttentionState()
        capture = ProjectedAttention(state, True, self.backend.attention(), attention_modules_by_block(unet))
        patches: dict = {}
        engines = forge_engines(sd_model)
        if engines:
            text = engines_text_side(sd_model, size, engines, lambda: self.backend.load_patcher(objects.clip.patcher))
        else:
            from modules import sd_hijack

            text = a1111_text_side(sd_model, size, sd_hijack.model_hijack.embedding_db,
                                   lambda: trainable(encoder_module(sd_model.cond_stage_model)))

        def predict(x, t, context):
            self.backend.load_patcher(unet_patcher)
            dtype = getattr(unet_patcher.model, "computation_dtype", None) or next(unet.parameters()).dtype
            options = {"patches_replace": TRAINABLE_ATTENTION if torch.is_grad_enabled() else patches}
            with trainable(unet):
                return unet(x.to(dtype), t, **unet_conditioning(context, dtype), transformer_options=options).float()

        @contextlib.contextmanager
        def attention() -> Iterator[AttentionState]:
            patches["attn2"] = dict.fromkeys(FORGE_BLOCKS, capture)
            try:
                yield state
            finally:
                patches.clear()

        return ConceptModel(unet=unet, predict=predict, **text, alphas_cumprod=alphas_cumprod(sd_model, unet_patcher),
                            lora_layers=lora_layers(unet), attention=attention)

    def loaded_embeddings(self) -> set[str]:
        return {word for db in databases() for word in db.word_embeddings}

    def reload_embeddings(self) -> None:
        """Every database that lists embeddings: the text engines' (what prompts use) and the API's."""
        dbs = databases()
        for db in dbs:
            db.load_textual_inversion_embeddings(**({} if forge_engines(current_model()) else {"force_reload": True}))
        api = api_embedding_db(self.app)
        if api is not None and all(api is not db for db in dbs):
            api.load_textual_inversion_embeddings(force_reload=True, sync_with_sd_model=False)


def original_objects(sd_model):
    """The checkpoint's own patchers: Forge keeps the last job's LoRA patches in ``forge_objects``, and loading
    a patcher writes its patches into the weights shared by both."""
    return getattr(sd_model, "forge_objects_original", None) or sd_model.forge_objects


def current_model():
    from modules import shared

    return shared.sd_model


def databases() -> list:
    """The embedding databases prompts are read with: each Forge engine's, or A1111's hijack's in Classic and reForge."""
    engines = forge_engines(current_model())
    if engines:
        return [e.embeddings for e in engines]
    from modules import sd_hijack

    return [sd_hijack.model_hijack.embedding_db]


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
