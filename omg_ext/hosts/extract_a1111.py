"""A1111's model for an extraction: its ``cond_stage_model`` with the hijack's embedding database, the ldm UNet
under the host's autocast (the engine's attention processors capture its cross-attention)."""
from __future__ import annotations

import torch

from ..concepts.model import ConceptModel
from .extract_host import cycled, lent_embeddings, lora_layers, token_positions


def embedding_db():
    from modules import sd_hijack

    return sd_hijack.model_hijack.embedding_db


class A1111Extract:
    def concept_model(self, sd_model) -> ConceptModel:
        from modules import devices

        clip, unet, db = sd_model.cond_stage_model, sd_model.model.diffusion_model, embedding_db()

        def encode(prompts: list[str], vectors: dict) -> torch.Tensor:
            with lent_embeddings(db, sd_model, vectors), devices.autocast():
                return clip(prompts)

        def positions(prompt: str, word: str, vectors: dict) -> list[int]:
            with lent_embeddings(db, sd_model, {k: v.detach() for k, v in vectors.items()}):
                return token_positions(clip, prompt, word, vectors)

        def init_vectors(text: str, n: int) -> torch.Tensor:
            with devices.autocast():
                return cycled(clip.encode_embedding_init_text(text, n).float(), n, text)

        def predict(x, t, context):
            with devices.autocast():
                return unet(x.to(devices.dtype_unet), t, context=context.to(devices.dtype_unet)).float()

        return ConceptModel(unet=unet, predict=predict, encode=encode, positions=positions, init_vectors=init_vectors,
                            alphas_cumprod=sd_model.alphas_cumprod.float().cpu(), lora_layers=lora_layers(unet))

    def loaded_embeddings(self) -> set[str]:
        return set(embedding_db().word_embeddings)

    def reload_embeddings(self) -> None:
        embedding_db().load_textual_inversion_embeddings(force_reload=True)
