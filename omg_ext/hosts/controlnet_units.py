"""A concept's own ControlNet unit: finding it in the job's ControlNet panel, and in A1111 giving it to one concept.

Both hosts' ControlNet keep their units as the ControlNet script's arguments of the job
(``p.script_args``, in the panel's order); a concept names a unit by its number there.
What differs is where a unit's residuals are made:

- Forge's ControlNet sums all units for the host rows before the UNet call (handled in
  ``forge.py``);
- A1111's sd-webui-controlnet computes each enabled unit's residuals inside its own UNet
  forward, from the rows it is given: OMG's rows included. There a unit given to one
  concept has its control model wrapped for the job (``ConceptControl``): its residuals
  are kept on that concept's rows only (zero on host rows, on other concepts' rows and
  in pass 1), so it acts inside the concept's mask. The wrappers go when the job ends.
  It also tells cond rows from uncond rows by a mark token it puts before each prompt's
  conditioning (``adopt_prompt_marks``).
- Its IP-Adapter units add an image-prompt attention term to each ``attn2`` output (the
  functions in the module's ``ipadapter_hacks``, called by the module's replaced forward).
  Where OMG computes the attention itself, it adds them too (``ip_adapter_terms``); a unit
  given to one concept has its functions wrapped for the job (``ConceptTerm``), keeping the
  term on that concept's rows; and each unit's cache of projected image-prompt keys and
  values, made for the rows of the first call of a sampling, is emptied before each of
  OMG's calls, whose rows differ (``fresh_ip_adapter_caches``).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch

from .errors import OmgUserError


def controlnet_script(p):
    """The job's ControlNet script, or None."""
    scripts = getattr(p, "scripts", None)
    return next((s for s in scripts.alwayson_scripts if s.title() == "ControlNet"), None) if scripts else None


def panel_units(p) -> tuple[object, list[int]]:
    """(the job's ControlNet script, the numbers of its enabled units in the panel's order)."""
    script = controlnet_script(p)
    if script is None:
        raise OmgUserError("OMG: a concept has a ControlNet unit of its own, but this WebUI has no ControlNet")
    panel = list(p.script_args[script.args_from:script.args_to])
    enabled = [k for k, unit in enumerate(panel) if (unit.get("enabled") if isinstance(unit, dict) else getattr(unit, "enabled", False))]
    return script, enabled


def not_enabled(concept: int, unit: int) -> OmgUserError:
    return OmgUserError(f"OMG concept {concept + 1}: ControlNet unit {unit} is not enabled (enable it, or set the concept's unit to -1)")


def without_model(concept: int, unit: int) -> OmgUserError:
    return OmgUserError(f"OMG concept {concept + 1}: ControlNet unit {unit} has neither a ControlNet nor an IP-Adapter model "
                        "loaded; only those can be given to one concept")


class RowConcepts:
    """Each row's concept (-1: host or reference row) in the UNet call running now; None outside OMG's calls."""

    def __init__(self) -> None:
        self.now: torch.Tensor | None = None

    def keep(self, concept: int, like: torch.Tensor) -> torch.Tensor:
        """[rows, 1, 1, 1]: 1 on ``concept``'s rows, 0 elsewhere (all 0 outside OMG's calls)."""
        if self.now is None or self.now.shape[0] != like.shape[0]:
            return torch.zeros(like.shape[0], 1, 1, 1, dtype=like.dtype, device=like.device)
        return (self.now == concept).to(like.device, like.dtype).view(-1, 1, 1, 1)


class ConceptControl:
    """sd-webui-controlnet's control model of one unit, for one concept: attributes are the model's, and
    each call's residuals are kept on that concept's rows only."""

    def __init__(self, model, concept: int, rows: RowConcepts) -> None:
        self.__dict__.update(_model=model, _concept=concept, _rows=rows)

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        residuals = self._model(*args, **kwargs)
        keep = self._rows.keep(self._concept, residuals[0])  # the same rows, dtype and device for every residual
        return [r * keep for r in residuals]


class ConceptTerm:
    """One of sd-webui-controlnet's IP-Adapter functions of an ``attn2`` module, for one concept: its term kept on that
    concept's rows only."""

    def __init__(self, term, concept: int, rows: RowConcepts) -> None:
        self.term, self.concept, self.rows = term, concept, rows

    def __call__(self, attn, x: torch.Tensor, q: torch.Tensor):
        out = self.term(attn, x, q)
        return out * self.rows.keep(self.concept, out).view(-1, 1, 1) if torch.is_tensor(out) else out


def ip_adapter_terms(module, x: torch.Tensor, q: torch.Tensor):
    """sd-webui-controlnet's IP-Adapter terms of an attention module, as its replaced forward adds them
    (``attn_forward_hacked``: each function of ``ipadapter_hacks`` given q as [rows, heads, n, d]); 0 without any."""
    terms = getattr(module, "ipadapter_hacks", None)
    if not terms:
        return 0.0
    rows, n, inner = q.shape
    q = q.view(rows, n, module.heads, inner // module.heads).transpose(1, 2)
    return sum(term(module, x, q) for term in terms)


def unit_of(term) -> object:
    """The IP-Adapter object (sd-webui-controlnet's ``PlugableIPAdapter``) an ``ipadapter_hacks`` function belongs to."""
    term = inspect.unwrap(term)  # under its ``torch.no_grad()`` decorator
    return inspect.getclosurevars(term).nonlocals.get("self") if inspect.isfunction(term) else None


PROMPT_MARK = 1024.0
"""sd-webui-controlnet's mark: one leading token of +1024 (cond) or -1024 (uncond) before each prompt's conditioning,
stripped again in its UNet forward (``hook.py``: ``POSITIVE_MARK_TOKEN``, ``MARK_EPS`` 1e-3)."""


def adopt_prompt_marks(context: torch.Tensor, roles, conds) -> None:
    """Give the concepts' conditioning (``conds``: the engine's, with cond and uncond dicts) the mark token the host
    rows of this call carry, once: sd-webui-controlnet then tells a concept row's role as it tells a host row's,
    and concept rows of the same length share the host rows' UNet call (unmarked, they ran in a call of their own,
    all taken for cond rows). Nothing happens where the host rows carry no mark."""
    first = context[:, 0].float()
    if context.shape[1] % 77 != 1 or not torch.all((first.abs() - PROMPT_MARK).abs() < 1e-3):
        return
    for role, row in zip(roles, context):
        for concept in conds:
            own = concept.cond if role.is_cond else concept.uncond
            if own["context"].shape[1] % 77 == 0:
                own["context"] = torch.cat([row[None, :1].to(own["context"]), own["context"]], dim=1)


def is_ip_adapter(param) -> bool:
    return getattr(getattr(param, "control_model_type", None), "name", "") == "IPAdapter"


def job_params(script) -> list:
    """The ``ControlParams`` sd-webui-controlnet's hook made for the job (``script``: its script, or None), one per
    enabled unit in the panel's order."""
    return list(getattr(getattr(script, "latest_network", None), "control_params", None) or [])


def sd_webui_controlnet_params(p, units: dict[int, int]) -> dict[int, object]:
    """Concept -> the ``ControlParams`` sd-webui-controlnet made for its unit (``units``: concept -> the unit's number
    in the panel); ControlNet and IP-Adapter models can be given."""
    if not units:
        return {}
    script, enabled = panel_units(p)
    params, found = job_params(script), {}
    for j, k in units.items():
        if k not in enabled:
            raise not_enabled(j, k)
        param = params[enabled.index(k)] if enabled.index(k) < len(params) else None
        if not (is_ip_adapter(param) or getattr(getattr(param, "control_model_type", None), "is_controlnet", False)):
            raise without_model(j, k)
        found[j] = param
    return found


@contextlib.contextmanager
def concept_controls(params: dict[int, object], rows: RowConcepts, unet) -> Iterator[None]:
    """Each concept's unit given to its rows for the scope: a ControlNet's model wrapped (``ConceptControl``), an
    IP-Adapter's functions on ``unet``'s attention modules wrapped (``ConceptTerm``); all put back on exit."""
    saved = [(param, param.control_model) for param in params.values()]
    owners = {id(param.control_model): j for j, param in params.items() if is_ip_adapter(param)}
    lists = [(module, list(module.ipadapter_hacks)) for module in unet.modules() if getattr(module, "ipadapter_hacks", None)]
    try:
        for j, param in params.items():
            if not is_ip_adapter(param):
                param.control_model = ConceptControl(param.control_model, j, rows)
        for module, terms in lists:
            module.ipadapter_hacks[:] = [ConceptTerm(term, owners[id(unit_of(term))], rows) if id(unit_of(term)) in owners
                                         else term for term in terms]
        yield
    finally:
        for param, model in saved:
            param.control_model = model
        for module, terms in lists:
            module.ipadapter_hacks[:] = terms


def fresh_ip_adapter_caches(params: list) -> None:
    """Empty each IP-Adapter unit's cache of projected image-prompt keys and values (made for the rows of the call
    that filled it; OMG's calls have other rows: 2 + k per image in pass 2)."""
    for param in params:
        if is_ip_adapter(param) and isinstance(getattr(param.control_model, "cache", None), dict):
            param.control_model.cache = {}
