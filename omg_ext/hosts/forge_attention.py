"""OMG's attention inside Forge's UNet: the attn1/attn2 replace patches of one engine call, wrapped around
another extension's patch of the same block (IP-Adapter, also one IP-Adapter unit given to one concept), and
the transformer options that describe an engine call's rows to such patches."""
from __future__ import annotations

import copy
from typing import Callable

import torch

from ..engine.attention import ProjectedAttention


ROW_CONCEPTS = "omg_row_concepts"
"""Transformer option of an engine call: each row's concept (-1: host or reference row), when a concept has a unit."""


def row_options(options: dict, uncond: torch.Tensor, concept: torch.Tensor | None = None) -> dict:
    """Forge's transformer options for rows whose marks are ``uncond``: ``cond_or_uncond`` one chunk per row
    (so a patch that splits rows by it — IP-Adapter — finds each row's own), with the ``cond_mark`` and
    index lists Forge derives from it; ``concept``: each row's concept, for per-concept image prompts."""
    marks = [int(m) for m in uncond.tolist()]
    row = {**options, "cond_or_uncond": marks, "cond_mark": uncond.to(options["cond_mark"]) if "cond_mark" in options else uncond,
           "cond_indices": [i for i, m in enumerate(marks) if m == 0],
           "uncond_indices": [i for i, m in enumerate(marks) if m == 1]}
    if concept is not None:
        row[ROW_CONCEPTS] = concept
    return row


class AroundPatch:
    """OMG's attention on a block where another extension has its own attn2 replace patch (IP-Adapter).

    Such a patch returns the plain attention plus what it adds (the image prompt's attention);
    OMG's attention takes the place of the plain one: ``omg + (theirs - plain)``. Without an OMG
    call in progress it is their patch alone, exactly.

    ``image_prompts`` (IP-Adapter entry -> concept): entries that act on that concept's rows
    only. IP-Adapter's patch adds one term per unit (``CrossAttentionPatch``: parallel lists,
    one entry per unit); the patch is run with the other entries for every row and with
    each such entry alone for its concept's rows.
    """

    def __init__(self, omg: ProjectedAttention, theirs, image_prompts: dict[int, int] | None = None) -> None:
        self.omg, self.theirs, self.image_prompts = omg, theirs, image_prompts or {}
        self._parts: tuple | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        if not self.image_prompts:
            theirs = self.theirs(q, k, v, extra_options)
            if self.omg.state.call is None:
                return theirs
            return self.omg(q, k, v, extra_options) + (theirs - self.omg.attention(q, k, v, extra_options["n_heads"]))
        plain = self.omg.attention(q, k, v, extra_options["n_heads"])
        everyone, alone = self.parts()
        own = plain if self.omg.state.call is None else self.omg(q, k, v, extra_options)
        out = own + (everyone(q, k, v, extra_options) - plain)
        concepts = extra_options.get(ROW_CONCEPTS)
        for concept, patch in alone:
            rows = None if concepts is None else (concepts == concept).view(-1, 1, 1)
            if rows is not None and bool(rows.any()):
                out = out + (patch(q, k, v, extra_options) - plain) * rows.to(out.dtype)
        return out

    def parts(self) -> tuple:
        """(their patch without the per-concept entries, [(concept, their patch with its entry alone)])."""
        if self._parts is None:
            self._parts = (image_prompt_entries(self.theirs, lambda i: i not in self.image_prompts),
                           [(j, image_prompt_entries(self.theirs, lambda i, e=e: i == e)) for e, j in self.image_prompts.items()])
        return self._parts


def image_prompt_entries(patch, keep: Callable[[int], bool]):
    """A copy of IP-Adapter's ``CrossAttentionPatch`` holding only the entries (units) ``keep`` accepts: every
    per-unit list of it (weights, conds, unconds, masks, sigma ranges…) filtered alike."""
    weights = getattr(patch, "weights", None)
    if not isinstance(weights, list):
        raise RuntimeError(f"OMG: this IP-Adapter's attention patch ({type(patch).__name__}) keeps no per-unit lists; "
                           "a unit for one concept is not possible with it")
    clone = copy.copy(patch)
    for name, value in vars(patch).items():
        if isinstance(value, list) and len(value) == len(weights):
            setattr(clone, name, [item for i, item in enumerate(value) if keep(i)])
    return clone


FORGE_BLOCKS = [(name, number, index) for name in ("input", "middle", "output") for number in range(16) for index in range(16)]
"""Every key Forge's ``set_model_replace_all`` covers: (block name, number, transformer index)."""


def with_omg_patches(replace: dict, cross: ProjectedAttention, self_attention: ProjectedAttention | None,
                     image_prompts: dict[int, int] | None = None) -> dict:
    """A ``patches_replace`` table: OMG's attn2 (around another extension's patch of that block, looked up as
    Forge does: by block and index, then by block) and, for self-attention preservation, its attn1.
    ``image_prompts``: IP-Adapter entries given to one concept (``AroundPatch``)."""
    theirs = replace.get("attn2", {})
    attn2 = {}
    for key in FORGE_BLOCKS:
        other = theirs.get(key, theirs.get(key[:2]))
        attn2[key] = cross if other is None else AroundPatch(cross, other, image_prompts)
    table = {**replace, "attn2": attn2}
    if self_attention is not None:
        table["attn1"] = dict.fromkeys(FORGE_BLOCKS, self_attention)
    return table


def attention_modules_by_block(unet: torch.nn.Module) -> dict[tuple[str, int, int], torch.nn.Module]:
    """Forge's key of each transformer block's ``attn2`` — ``extra_options``' (block name, number) and
    ``block_index`` — to the module: fast mode projects the concept prompts with it."""
    names = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}
    found = {}
    for name, module in unet.named_modules():
        parts = name.split(".")
        if parts[-1] == "attn2" and parts[0] in names and "transformer_blocks" in parts:
            number = 0 if parts[0] == "middle_block" else int(parts[1])
            found[names[parts[0]], number, int(parts[parts.index("transformer_blocks") + 1])] = module
    return found
