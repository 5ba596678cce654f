"""``modules.devices``: autocast, a no-op on the CPU as in A1111 with ``--no-half``."""
import contextlib


def autocast(disable=False):
    return contextlib.nullcontext()


device = "cpu"
dtype_unet = dtype_vae = dtype = __import__("torch").float32
