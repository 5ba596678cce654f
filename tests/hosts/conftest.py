"""Each adapter test starts without the concepts a previous test's jobs kept (``concept_cache``):
the stand-in models of two tests may even share an ``id``."""
import pytest

from omg_ext.hosts.concept_cache import CONCEPTS


@pytest.fixture(autouse=True)
def no_concepts_kept_from_another_test():
    CONCEPTS.clear()
    yield
    CONCEPTS.clear()
