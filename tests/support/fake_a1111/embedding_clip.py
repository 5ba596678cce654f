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

    def __init__(self, database=None):
        """``database``: where embeddings are found (a callable giving it); the hijack's by default."""
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(200, CTX)
        self.proj = nn.Linear(CTX, CTX)
        self.database = database

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
        return self.embed(torch.tensor(self.tokenize([text])[0][:n]))

    def forward(self, texts):
        rows = []
        for text in texts:
            (chunk,), _ = self.tokenize_line(text)
            x = self.embed(torch.tensor(chunk.tokens))
            for fix in chunk.fixes:
                vec = fix.embedding.vec.to(x)
                x = torch.cat([x[:fix.offset + 1], vec, x[fix.offset + 1 + len(vec):]])
            rows.append(self.proj(x))
        return torch.stack(rows)
