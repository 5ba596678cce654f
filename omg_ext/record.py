"""The pass-1 record: what pass 2 replays and uses as its layout reference.

Pass 2 runs the same sampler with the same seed and noise, so its k-th UNet call
corresponds to pass 1's k-th call. Before the blend start, a pass-2 call whose input
equals the recorded input gets the recorded output back without running the UNet. From
the blend start on, the recorded input of the same call is the reference row's latent.
Outputs are kept only for the calls pass 2 can replay (before the blend start).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RecordedCall:
    x: torch.Tensor
    t: torch.Tensor
    out: torch.Tensor | None

    def matches(self, x: torch.Tensor, t: torch.Tensor) -> bool:
        """The cheap check that lets a replay stand in for a UNet call: same input, same time."""
        return self.same_time(x, t) and torch.equal(x, self.x)

    def same_time(self, x: torch.Tensor, t: torch.Tensor) -> bool:
        return x.shape == self.x.shape and torch.equal(t, self.t)


@dataclass
class PassRecord:
    calls: list[RecordedCall] = field(default_factory=list)

    def add(self, x: torch.Tensor, t: torch.Tensor, out: torch.Tensor | None) -> None:
        self.calls.append(RecordedCall(x.clone(), t.clone(), None if out is None else out.clone()))

    def get(self, index: int) -> RecordedCall | None:
        return self.calls[index] if index < len(self.calls) else None

    def nbytes(self) -> int:
        """Memory held by the record, for the benchmark and the log."""
        return sum(
            t.numel() * t.element_size()
            for call in self.calls
            for t in (call.x, call.t, call.out)
            if t is not None
        )

    def latent_hw(self) -> tuple[int, int]:
        if not self.calls:
            raise RuntimeError("OMG: pass 1 made no UNet call")
        return tuple(self.calls[0].x.shape[-2:])
