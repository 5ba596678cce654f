"""The tiny UNet and two concepts (a LoRA, and one with dense deltas) that the fast-mode and one-pass tests share."""
import pytest

from omg_ext.engine.session import Concept
from minisd.loras import random_concept_deltas
from minisd.unet import TinyUNet, text_context


@pytest.fixture(scope="module")
def unet():
    return TinyUNet(context_dim=64, seed=0)


@pytest.fixture(scope="module")
def concepts(unet):
    return [Concept({"context": text_context(10)}, {"context": text_context(11)}, random_concept_deltas(unet, seed=1), [5]),
            Concept({"context": text_context(20)}, {"context": text_context(21)},
                    random_concept_deltas(unet, seed=2, dense_every=4), [8, 9])]
