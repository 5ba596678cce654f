"""``modules.sd_hijack``: the ``model_hijack`` whose ``embedding_db`` holds the loaded embeddings."""
from .textual_inversion.textual_inversion import EmbeddingDatabase


class StableDiffusionModelHijack:
    def __init__(self):
        self.embedding_db = EmbeddingDatabase()


model_hijack = StableDiffusionModelHijack()
