"""How many rows one pass-2 UNet call may stack: free memory over one row's activation bytes.

Pass 2 runs ``2 + 2k`` rows (plus a reference row) per host row pair; at SDXL sizes that is
gigabytes of activations on top of the model. A row's cost is measured, not guessed: the
first pass-1 call (host rows with attention capture, the same work a pass-2 row does) is
run under a meter, and its peak bytes above what was allocated before, per row, is the
row cost for the job. Before each pass-2 call the free memory is read again (other
extensions, the host's offloading and the cache change it), and the call is cut into
chunks of at most ``free × margin / row cost`` rows. Where the estimate is still too
high, ``RowLimit`` halves a call that runs out of memory (expand.py).

Meters: CUDA's allocator peak (exact, includes kernel workspaces); elsewhere
``LiveBytes``, which adds up the storages of the tensors alive during the call.
"""
from __future__ import annotations

import logging
import weakref
from typing import Callable

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

log = logging.getLogger("sd-webui-omg")

FreeBytes = Callable[[torch.device], "int | None"]


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages alive at once while the mode is active, on any device.

    Every operator's outputs are counted once per storage (views share it) until the last
    tensor object holding the storage is gone. Kernel workspaces that never become tensors
    are not seen, which is why CUDA uses its allocator instead.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._holders: dict[int, int] = {}

    def _release(self, storage: int, nbytes: int) -> None:
        self._holders[storage] -= 1
        if not self._holders[storage]:
            del self._holders[storage]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key, nbytes = storage._cdata, storage.nbytes()
                if key not in self._holders:
                    self._holders[key] = 0
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self._holders[key] += 1
                weakref.finalize(tensor, self._release, key, nbytes)
        return out


def measure_peak(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, int]:
    """``fn()`` and the peak bytes it allocated above what was allocated before it."""
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        return out, torch.cuda.max_memory_allocated(device) - before
    with LiveBytes() as meter:
        out = fn()
    return out, meter.peak


def free_device_bytes(device: torch.device) -> int | None:
    """Memory a pass-2 call can use on ``device``: CUDA's free memory plus torch's cached, unused blocks.

    None (no limit) elsewhere: on a CPU the operating system pages; a budget is given explicitly there.
    """
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


class MemoryBudget:
    """Rows per pass-2 call from a measured row cost and the memory free (or a fixed budget).

    ``budget_bytes``: a fixed number of bytes for one call's activations (CPU, a user's cap);
    otherwise ``free_bytes(device)`` is read before every call (default: CUDA's free memory,
    hosts pass their own reader). ``margin``: the share of that memory OMG plans to fill.
    """

    def __init__(self, budget_bytes: int | None = None, free_bytes: FreeBytes = free_device_bytes,
                 margin: float = 0.8) -> None:
        if budget_bytes is not None and budget_bytes <= 0:
            raise ValueError(f"the memory budget must be a positive number of bytes, got {budget_bytes}")
        if not 0 < margin <= 1:
            raise ValueError(f"the memory margin must be a fraction in (0, 1], got {margin}")
        self.budget_bytes, self.free_bytes, self.margin = budget_bytes, free_bytes, margin
        self.measured: tuple[int, int] | None = None
        """(bytes per row, latent area) of the measured call."""
        self._warned = False

    def available(self, device: torch.device) -> int | None:
        """Bytes one call may use now, None for no limit."""
        return self.budget_bytes if self.budget_bytes is not None else self.free_bytes(device)

    def wants_measure(self, device: torch.device) -> bool:
        """Whether the next pass-1 call should be measured: only once, and only where a limit exists."""
        return self.measured is None and self.available(device) is not None

    def measure(self, fn: Callable[[], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Run a call on latent ``x`` under the meter and keep its cost per row."""
        out, peak = measure_peak(fn, x.device)
        rows, height, width = x.shape[0], *x.shape[-2:]
        self.measured = (max(1, -(-peak // rows)), height * width)
        return out

    def row_bytes(self, hw: tuple[int, int]) -> int | None:
        """One row's bytes at latent size ``hw``: activations grow with the area (a hires pass)."""
        if self.measured is None:
            return None
        per_row, area = self.measured
        return -(-per_row * hw[0] * hw[1] // area)

    def rows(self, x: torch.Tensor, smallest: int) -> int | None:
        """The most rows a call on latents like ``x`` may take; never below ``smallest`` (one unit), with one warning."""
        available, row_bytes = self.available(x.device), self.row_bytes(tuple(x.shape[-2:]))
        if available is None or row_bytes is None:
            return None
        fits = int(available * self.margin) // row_bytes
        if fits < smallest:
            if not self._warned:
                log.warning("OMG: %d MB of memory for pass 2 but one row needs %.1f MB: running %d rows per call, "
                            "which may not fit", available >> 20, row_bytes / 2**20, smallest)
                self._warned = True
            return smallest
        return fits
