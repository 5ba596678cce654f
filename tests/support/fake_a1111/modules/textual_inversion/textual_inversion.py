"""``modules/textual_inversion/textual_inversion.py`` of A1111 v1.10.1: ``Embedding``, the database's
registration (``register_embedding_by_name``, with its in-place list update) and the loader's rules for a
``.safetensors`` file (``create_embedding_from_data``: one tensor, or SDXL's ``clip_l`` and ``clip_g``), as the
host has them."""
import os

import safetensors.torch
import torch


class Embedding:
    def __init__(self, vec, name, step=None):
        self.vec, self.name, self.step = vec, name, step
        self.shape, self.vectors = None, 0
        self.filename = None


def create_embedding_from_data(data, name, filename="unknown embedding file", filepath=None):
    if "clip_g" in data and "clip_l" in data:
        vec = {k: v.detach().float() for k, v in data.items()}
        shape, vectors = data["clip_g"].shape[-1] + data["clip_l"].shape[-1], data["clip_g"].shape[0]
    elif isinstance(next(iter(data.values())), torch.Tensor):
        assert len(data.keys()) == 1, "embedding file has multiple terms in it"
        emb = next(iter(data.values()))
        if len(emb.shape) == 1:
            emb = emb.unsqueeze(0)
        vec = emb.detach().float()
        shape, vectors = vec.shape[-1], vec.shape[0]
    else:
        raise Exception(f"Couldn't identify {filename} as neither textual inversion embedding nor diffuser concept.")
    embedding = Embedding(vec, name)
    embedding.vectors, embedding.shape, embedding.filename = vectors, shape, filepath
    return embedding


class EmbeddingDatabase:
    def __init__(self):
        self.ids_lookup, self.word_embeddings, self.skipped_embeddings = {}, {}, {}
        self.expected_shape = -1
        self.loads = 0

    def register_embedding(self, embedding, model):
        return self.register_embedding_by_name(embedding, model, embedding.name)

    def register_embedding_by_name(self, embedding, model, name):
        ids = model.cond_stage_model.tokenize([name])[0]
        first_id = ids[0]
        if first_id not in self.ids_lookup:
            self.ids_lookup[first_id] = []
        if name in self.word_embeddings:
            lookup = [x for x in self.ids_lookup[first_id] if x[1].name != name]
        else:
            lookup = self.ids_lookup[first_id]
        lookup += [(ids, embedding)]
        self.ids_lookup[first_id] = sorted(lookup, key=lambda x: len(x[0]), reverse=True)
        self.word_embeddings[name] = embedding
        return embedding

    def find_embedding_at_position(self, tokens, offset):
        possible_matches = self.ids_lookup.get(tokens[offset], None)
        if possible_matches is None:
            return None, None
        for ids, embedding in possible_matches:
            if tokens[offset:offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, None

    def load_textual_inversion_embeddings(self, force_reload=False):
        from modules import shared

        self.ids_lookup.clear()
        self.word_embeddings.clear()
        self.loads += 1
        folder = shared.cmd_opts.embeddings_dir
        for filename in sorted(os.listdir(folder)):
            name, ext = os.path.splitext(filename)
            if ext.upper() != ".SAFETENSORS":
                continue
            path = os.path.join(folder, filename)
            embedding = create_embedding_from_data(safetensors.torch.load_file(path, device="cpu"), name, filename, path)
            if self.expected_shape == -1 or self.expected_shape == embedding.shape:
                self.register_embedding(embedding, shared.sd_model)
            else:
                self.skipped_embeddings[name] = embedding
