"""``CLIP`` as in Forge's ``backend/patcher/clip.py``: a patcher over the text encoder."""
from .base import ModelPatcher


class CLIP:
    def __init__(self, cond_stage_model=None, no_init=False):
        if no_init:
            return
        self.cond_stage_model = cond_stage_model
        self.patcher = ModelPatcher(cond_stage_model)

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        return n

    def add_patches(self, *args, **kwargs):
        return self.patcher.add_patches(*args, **kwargs)
