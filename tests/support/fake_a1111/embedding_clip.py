"""A text encoder as A1111's ``FrozenCLIPEmbedderWithCustomWords`` (and Forge's ``ClassicTextProcessingEngine``)
treats embeddings: ``tokenize`` / ``tokenize_line`` find them in a database and place them as ``PromptChunkFix``es,
and the forward puts their vectors at those places (``EmbeddingsWithFixes``)."""
import types

import torch
from torch import nn

CTX = 64


class EmbeddingClip(nn.Module):
    """A text encoder with A1111's ``tokenize`` / ``tokenize_line`` (embeddings found through the hijack's
    database, placed as ``PromptChunkFix``es) and ``EmbeddingsWithFixes``' substitution of their vectors."""

    vocab: dict = {}

    def __init__(self, database=None, dim=CTX, key="clip_l", pooled=False, seed=0):
        """``database``: where embeddings are found (a callable giving it); the hijack's by default. ``key``: the
        part of an SDXL embedding this encoder takes (A1111's ``textual_inversion_key``); ``pooled``: CLIP-G's
        encoder, which also gives a pooled output and whose init text lookup keeps every token."""
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(200, dim)
        self.proj = nn.Linear(dim, dim)
        self.database, self.key, self.return_pooled = database, key, pooled

    def tokenize(self, texts):
        return [[self.vocab.setdefault(w, len(self.vocab) + 2) for w in t.replace(",", " ").split()] for t in texts]

    def tokenize_line(self, line):
        from modules import sd_hijack

        db = self.database() if self.database else sd_hijack.model_hijack.embedding_db
        ids, tokens, fixes, i = self.tokenize([line])[0], [], [], 0
        while i < len(ids):
            embedding, length = db.find_embedding_at_position(ids, i)
            if embedding is None:
                tokens.append(ids[i])
                i += 1
                continue
            fixes.append(types.SimpleNamespace(offset=len(tokens), embedding=embedding))
            tokens += [0] * int(embedding.vectors)
            i += length
        return [types.SimpleNamespace(tokens=[0] + tokens + [1] * (76 - len(tokens)), fixes=fixes)], len(tokens)

    def encode_embedding_init_text(self, text, n):
        ids = self.tokenize([text])[0]
        return self.embed(torch.tensor(ids if self.return_pooled else ids[:n]))

    def forward(self, texts):
        rows = []
        for text in texts:
            (chunk,), _ = self.tokenize_line(text)
            x = self.embed(torch.tensor(chunk.tokens))
            for fix in chunk.fixes:
                vec = fix.embedding.vec
                vec = (vec[self.key] if isinstance(vec, dict) else vec).to(x)
                x = torch.cat([x[:fix.offset + 1], vec, x[fix.offset + 1 + len(vec):]])
            rows.append(self.proj(x))
        z = torch.stack(rows)
        return (z, z[:, -1] + z.mean(1)) if self.return_pooled else z


SIZE_FEATURES = 4


def size_features(width, height, rows):
    """The stand-in of SDXL's size embeddings (original and target size, crop): what ``vector`` holds after the pooled output."""
    return torch.tensor([height / 64, width / 64, 0.0, 1.0]).repeat(rows, 1)


class SdxlConditioner(nn.Module):
    """A1111's hijacked SDXL ``GeneralConditioner``: CLIP-L's and CLIP-G's encoders (``embedders``), each taking its
    part of an SDXL embedding; the conditioning as ``sd_models_xl.get_learned_conditioning`` gives it
    (``crossattn`` side by side, ``vector`` the pooled output then the size embeddings), with no gradient, as
    sgm runs frozen embedders; ``tokenize`` and ``encode_embedding_init_text`` as A1111 patches them in."""

    def __init__(self, dim_l=32, dim_g=48):
        super().__init__()
        self.embedders = nn.ModuleList([EmbeddingClip(dim=dim_l, key="clip_l", seed=0),
                                        EmbeddingClip(dim=dim_g, key="clip_g", pooled=True, seed=1)])

    def tokenize(self, texts):
        return self.embedders[0].tokenize(texts)

    def encode_embedding_init_text(self, text, n):
        return torch.cat([e.encode_embedding_init_text(text, n) for e in self.embedders], 1)

    def conditioning(self, batch):
        with torch.no_grad():
            cond_l, (cond_g, pooled) = self.embedders[0](list(batch)), self.embedders[1](list(batch))
        size = size_features(getattr(batch, "width", 1024) or 1024, getattr(batch, "height", 1024) or 1024, len(batch))
        return {"crossattn": torch.cat([cond_l, cond_g], 2), "vector": torch.cat([pooled, size], 1)}
