"""A1111's model for an extraction: its text encoders with the hijack's embedding database (SD1.5's
``cond_stage_model``; SDXL's conditioner with CLIP-L and CLIP-G, an embedding's vectors split between them as
its files keep them), the ldm/sgm UNet under the host's autocast (the engine's attention processors capture
its cross-attention)."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

from ..concepts.files import embedding_vectors
from ..concepts.model import ConceptModel
from .errors import OmgUserError
from .extract_host import cycled, joined, lent_embeddings, lent_positions, lora_layers, sdxl_encode, sdxl_parts, unet_conditioning


def embedding_db():
    from modules import sd_hijack

    return sd_hijack.model_hijack.embedding_db


def sdxl_text_encoders(sd_model) -> list:
    """SDXL's hijacked text encoders (CLIP-L's, then CLIP-G's); the refiner, with CLIP-G alone, is refused."""
    encoders = [e for e in sd_model.conditioner.embedders if hasattr(e, "tokenize_line")]
    if len(encoders) != 2:
        raise OmgUserError("extracting concepts needs SDXL's two text encoders (CLIP-L and CLIP-G): the SDXL refiner has one; load a base SDXL checkpoint")
    return encoders


def a1111_text_side(sd_model, size: tuple[int, int], db, scope: Callable[[], ContextManager] = contextlib.nullcontext) -> dict:
    """``ConceptModel``'s text fields on A1111's hijacked text encoders (also Forge Classic's and reForge's),
    ``scope`` around every differentiable encoding (Forge's ``trainable``)."""
    from modules import devices

    sdxl = bool(getattr(sd_model, "is_sdxl", False))
    encoders = sdxl_text_encoders(sd_model) if sdxl else [sd_model.cond_stage_model]
    with torch.no_grad(), devices.autocast():
        parts = sdxl_parts(*(e.encode_embedding_init_text("a", 1).shape[-1] for e in encoders)) if sdxl else None

    def lent(vectors: dict):
        return lent_embeddings(db, sd_model, {k: embedding_vectors(v, parts) for k, v in vectors.items()})

    def encode(prompts: list[str], vectors: dict):
        with lent(vectors), scope(), devices.autocast():
            if not sdxl:
                return encoders[0](prompts)
            return sdxl_encode(sd_model, encoders, prompts, size)

    def init_vectors(text: str, n: int) -> torch.Tensor:
        with torch.no_grad(), devices.autocast():
            return cycled(joined([e.encode_embedding_init_text(text, n).float() for e in encoders]), n, text)

    return dict(encode=encode, positions=lent_positions(lent, encoders[0]), init_vectors=init_vectors, parts=parts)


class A1111Extract:
    def loaded_model(self):
        from modules import shared

        return shared.sd_model

    def concept_model(self, sd_model, size: tuple[int, int] = (512, 512)) -> ConceptModel:
        """``size``: the pictures' (width, height), what SDXL's size conditioning says."""
        from modules import devices

        unet = sd_model.model.diffusion_model

        def predict(x, t, context):
            with devices.autocast():
                return unet(x.to(devices.dtype_unet), t, **unet_conditioning(context, devices.dtype_unet)).float()

        return ConceptModel(unet=unet, predict=predict, **a1111_text_side(sd_model, size, embedding_db()),
                            alphas_cumprod=sd_model.alphas_cumprod.float().cpu(), lora_layers=lora_layers(unet))

    def loaded_embeddings(self) -> set[str]:
        return set(embedding_db().word_embeddings)

    def reload_embeddings(self) -> None:
        embedding_db().load_textual_inversion_embeddings(force_reload=True)
