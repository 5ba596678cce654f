"""Stand-in for Forge's ``backend`` package (see ``tests/support/fake_forge``)."""
from . import patcher  # noqa: F401
