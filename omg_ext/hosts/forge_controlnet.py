"""Forge's ControlNet inside OMG's calls: the residuals Forge computed for its host rows handed to every engine
row of the same host row, and a concept's own ControlNet unit computed alone and moved to that concept's rows."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .controlnet_units import not_enabled, panel_units, without_model


CONTROL_KEY = "control:{}:{}"
"""How one ControlNet residual travels through the engine as a per-row conditioning entry."""


def split_control(control: dict | None, rows: int) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """Forge's ControlNet residuals — ``{"input"|"middle"|"output": [tensor or None, …]}``, summed over
    all units and computed for the call's host rows — as per-row entries the engine expands like any
    conditioning (a concept row and a reference row get their host row's residuals), plus the
    template that ``join_control`` fills back: a residual's place holds its key; ``None`` and a residual
    that broadcasts over rows stay as they are."""
    if control is None:
        return None, {}
    template, per_row = {}, {}
    for name, residuals in control.items():
        template[name] = []
        for i, residual in enumerate(residuals):
            if isinstance(residual, torch.Tensor) and residual.dim() > 0 and residual.shape[0] == rows:
                key = CONTROL_KEY.format(name, i)
                per_row[key] = residual
                residual = key
            template[name].append(residual)
    return template, per_row


def concept_unit_residuals(units: dict[int, "ConceptUnit"], c: dict, x: torch.Tensor, t: torch.Tensor, chunks: int,
                           per_row: dict) -> dict[int, dict]:
    """Each concept's own ControlNet unit taken out of the residuals Forge summed for the host rows (which keep
    the other units) and computed alone, for that concept's rows: ``per_row`` gets them as entries, and the
    templates to rebuild them per engine call are returned by concept."""
    chain = []
    node = c.get("control_model")
    while node is not None:
        chain.append(node)
        node = node.previous_controlnet
    templates = {}
    for j, concept_unit in units.items():
        unit = concept_unit.find(chain[::-1])
        if unit is None:
            continue  # not active in this sampling (its image failed, or another sampling than the unit's)
        previous, unit.previous_controlnet = unit.previous_controlnet, None
        extra = {"transformer_options": c.get("transformer_options", {})} if takes_options(unit.get_control) else {}
        try:
            alone = unit.get_control(x, t, dict(c), chunks, **extra)
        finally:
            unit.previous_controlnet = previous
        if alone is None:  # outside the unit's guidance start/end
            continue
        template, rows = split_control(alone, x.shape[0])
        for key, residual in rows.items():
            per_row[key] = per_row[key] - residual  # the host rows: the summed residuals without this unit
            per_row[f"{key}+{j}"] = residual
        templates[j] = {name: [f"{item}+{j}" if isinstance(item, str) else item for item in items]
                        for name, items in template.items()}
    return templates


def takes_options(get_control) -> bool:
    """reForge's ``get_control`` takes the call's transformer options too; Forge's and Classic's do not."""
    return "transformer_options" in inspect.signature(get_control).parameters


def add_to_rows(control: dict, extra: dict, rows: torch.Tensor) -> None:
    """``extra``'s residuals added to the ``rows`` (a bool per row) of ``control``."""
    where = rows.view(-1, 1, 1, 1)
    for name, residuals in extra.items():
        for i, residual in enumerate(residuals):
            if isinstance(residual, torch.Tensor):
                control[name][i] = control[name][i] + torch.where(where, residual, torch.zeros_like(residual))


def join_control(template: dict, cond: dict) -> dict:
    """The residuals of one engine call, taken out of ``cond``; fresh lists, because Forge's UNet pops them."""
    return {name: [cond.pop(item) if isinstance(item, str) else item for item in residuals]
            for name, residuals in template.items()}


def controlnet_unit_modules(p, units: dict[int, int]) -> tuple[dict[int, "ConceptUnit"], dict[int, int]]:
    """Concept -> its ControlNet unit, and IP-Adapter entry -> concept, for the concepts' own units (``units``:
    concept -> the unit's number in the ControlNet panel), read from the ControlNet script of the job: its units
    in the panel's order and, per enabled unit, the loaded model it keeps in ``current_params``. An IP-Adapter
    unit's entry is its place among the enabled IP-Adapter units (the order their patches were added in)."""
    if not units:
        return {}, {}
    script, enabled = panel_units(p)
    params = getattr(script, "current_params", {})
    models = {k: getattr(params.get(i), "model", None) for i, k in enumerate(enabled)}
    networks = {k: getattr(getattr(model, "model_patcher", None), "control_model", None) for k, model in models.items()}
    in_chain = [k for k in enabled if networks[k] is not None]  # the units that put a ControlNet in Forge's chain, in order
    image_units = [k for k in enabled if hasattr(models[k], "ip_adapter")]  # IP-Adapter units, in the order they patch
    found, image_prompts = {}, {}
    for j, k in units.items():
        if k not in enabled:
            raise not_enabled(j, k)
        if networks[k] is not None:
            found[j] = ConceptUnit(networks[k], in_chain.index(k))
        elif k in image_units:
            image_prompts[image_units.index(k)] = j
        else:
            raise without_model(j, k)
    return found, image_prompts


@dataclass(frozen=True)
class ConceptUnit:
    """A concept's own ControlNet unit: its network and its place among the chain's units (first added = 0).
    Two units with the same model file share the network (Forge caches loaded models): the place tells them apart."""

    network: torch.nn.Module
    place: int

    def find(self, chain_in_order: list):
        """This unit's ControlNet object in the sampling's chain, or None."""
        if self.place < len(chain_in_order) and chain_in_order[self.place].control_model is self.network:
            return chain_in_order[self.place]
        return next((n for n in chain_in_order if getattr(n, "control_model", None) is self.network), None)
