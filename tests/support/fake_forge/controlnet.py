"""Forge's ControlNet as the UNet wrapper sees it: ``c["control"]`` holds residuals for the call's rows.

Forge computes them before the wrapper (``ControlNet.get_control`` on the call's rows, all
units summed) and the UNet adds them with ``apply_control``, popping each list from its end.
Here a residual depends on its own row's latent, so a test can tell which row's residual
reached which row.
"""
import torch
import torch.nn.functional as F


class RowResidualControl:
    """``get_control(x, t, cond, batched_number)``: per row ``strength · mean_c(x_row)`` at each block's size, times a
    fixed per-channel vector, plus the ``previous_controlnet``'s (the units before it in Forge's chain)."""

    def __init__(self, unet, latent: tuple[int, int], context_dim: int, strength: float = 1.0, previous=None) -> None:
        self.strength, self.previous_controlnet = strength, previous
        self.control_model = torch.nn.Identity()  # the unit's network: Forge's copies of a unit share it
        self.calls: list[int] = []
        self.shapes = self._shapes(unet, latent, context_dim)

    @staticmethod
    def _shapes(unet, latent, context_dim) -> dict[str, list[tuple[int, int, int]]]:
        """(channels, h, w) of every input block's and the middle block's output, probed once."""
        shapes, hooks = {"input": [], "middle": []}, []
        for name, blocks in (("input", list(unet.input_blocks)), ("middle", [unet.middle_block])):
            for block in blocks:
                hooks.append(block.register_forward_hook(lambda m, i, o, name=name: shapes[name].append(tuple(o.shape[1:]))))
        try:
            with torch.no_grad():
                unet(torch.zeros(1, 4, *latent), torch.ones(1), context=torch.zeros(1, 77, context_dim))
        finally:
            for hook in hooks:
                hook.remove()
        return shapes

    def residual(self, x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        channels, h, w = shape
        weights = torch.linspace(-1, 1, channels, dtype=x.dtype)[None, :, None, None]
        return self.strength * F.interpolate(x.mean(dim=1, keepdim=True), size=(h, w), mode="bilinear") * weights

    def get_control(self, x, t, cond, batched_number):
        self.calls.append(x.shape[0])
        shapes = self.shapes
        inputs = [self.residual(x, s) for s in shapes["input"]]
        # Forge pops from the end: input residuals in reverse block order, skips reused by the output blocks
        own = {"input": inputs[::-1], "middle": [self.residual(x, shapes["middle"][0])],
               "output": [self.residual(x, s) for s in shapes["input"]]}
        if self.previous_controlnet is None:
            return own
        previous = self.previous_controlnet.get_control(x, t, cond, batched_number)  # Forge's chain: units summed
        return {name: [a + b for a, b in zip(own[name], previous[name])] for name in own}
