"""A word-level text encoder with CLIP's shape: ``[batch, tokens, dim]`` from a prompt.

Like CLIP's text model: a start token, the words, then end tokens padding to a fixed
length; token and position embeddings; pre-norm transformer layers with causal
self-attention (``q_proj``/``k_proj``/``v_proj``/``out_proj``, ``fc1``/``fc2``) and a final
norm. Module names follow Hugging Face's ``CLIPTextModel`` so kohya text-encoder keys
(``lora_te_text_model_encoder_layers_0_self_attn_q_proj``) are the ones SD1.5 LoRAs use.
Causal attention matters for LoRAs: a class word sees the trigger word before it.

Textual-inversion embeddings work as in the WebUIs: a word that names an embedding is
replaced by the embedding's vectors (one token each) before the position embeddings are
added, so an embedding of n vectors takes n positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .scenes import WORDS

BOS, EOS = "<bos>", "<eos>"
VOCAB = (BOS, EOS) + WORDS
TOKENS = 16
"""Context length (CLIP's is 77): a start token, up to 14 words, end tokens."""


def _words(prompt: str) -> list[str]:
    return prompt.lower().replace(",", " ").split()


def _slots(prompt: str, embeddings: dict | None) -> list[tuple[str, int]]:
    """(word, tokens it takes) of each word: an embedding's name takes one token per vector."""
    slots = [(w, len(embeddings[w]) if embeddings and w in embeddings else 1) for w in _words(prompt)]
    unknown = [w for w, _ in slots if w not in VOCAB and not (embeddings and w in embeddings)]
    if unknown:
        raise ValueError(f"toy text encoder: unknown words {unknown}; it knows {', '.join(WORDS)}")
    length = sum(n for _, n in slots)
    if length > TOKENS - 2:
        raise ValueError(f"toy text encoder: {length} tokens, at most {TOKENS - 2}")
    return slots


def tokenize(prompt: str) -> list[int]:
    """Token ids of a prompt, padded with end tokens to ``TOKENS``."""
    ids = [VOCAB.index(BOS)] + [VOCAB.index(w) for w, _ in _slots(prompt, None)]
    return ids + [VOCAB.index(EOS)] * (TOKENS - len(ids))


def word_positions(prompt: str, word: str, embeddings: dict | None = None) -> list[int]:
    """Positions of ``word``'s tokens in the encoded prompt (the start token is position 0)."""
    positions, at = [], 1
    for w, n in _slots(prompt, embeddings):
        if w == word:
            positions += range(at, at + n)
        at += n
    return positions


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (p(x).view(b, n, self.heads, c // self.heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.layer_norm1, self.self_attn = nn.LayerNorm(dim), SelfAttention(dim, heads)
        self.layer_norm2, self.mlp = nn.LayerNorm(dim), MLP(dim)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, dim: int, heads: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(dim, heads) for _ in range(layers)])


class Embeddings(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(len(VOCAB), dim)
        self.position_embedding = nn.Embedding(TOKENS, dim)


class TextModel(nn.Module):
    def __init__(self, dim: int, heads: int, layers: int):
        super().__init__()
        self.embeddings = Embeddings(dim)
        self.encoder = Encoder(dim, heads, layers)
        self.final_layer_norm = nn.LayerNorm(dim)


class TextEncoder(nn.Module):
    """``encoder(["a man on grass"]) -> [1, TOKENS, dim]``; ``embeddings``: name -> vectors [n, dim]."""

    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.text_model = TextModel(dim, heads, layers)

    def forward(self, prompts: list[str], embeddings: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        tm = self.text_model
        x = torch.stack([self._tokens(p, embeddings) for p in prompts]) + tm.embeddings.position_embedding.weight[None]
        for layer in tm.encoder.layers:
            x = layer(x)
        return tm.final_layer_norm(x)

    def _tokens(self, prompt: str, embeddings: dict | None) -> torch.Tensor:
        """[TOKENS, dim]: the prompt's token embeddings, an embedding's vectors in place of its name."""
        table = self.text_model.embeddings.token_embedding
        ids = lambda words: table(torch.tensor([VOCAB.index(w) for w in words], device=table.weight.device))  # noqa: E731
        parts, words = [ids([BOS])], []
        for w, _ in _slots(prompt, embeddings):
            if embeddings and w in embeddings:
                parts += [ids(words)] if words else []
                parts.append(embeddings[w].to(table.weight))
                words = []
            else:
                words.append(w)
        parts += [ids(words)] if words else []
        length = sum(len(p) for p in parts)
        return torch.cat(parts + [ids([EOS] * (TOKENS - length))])
