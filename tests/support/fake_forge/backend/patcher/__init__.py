"""Stand-in for ``backend.patcher``."""
