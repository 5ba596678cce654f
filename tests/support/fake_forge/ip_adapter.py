"""IP-Adapter's attn2 replace patch as Forge's ``sd_forge_ipadapter`` builds it (``CrossAttentionPatch``).

One object per block holds one entry per IP-Adapter unit in parallel lists (weight, cond and
uncond image embeddings, sigma range…); ``set_new_condition`` appends the next unit's. Called
with projected q, k, v it returns the plain attention plus each entry's image-prompt term, cond
or uncond per chunk of rows by ``cond_or_uncond``. Here an entry's image-prompt term is its
cond or uncond value times its weight, added everywhere, so each unit's share of an output can
be read back.
"""
import torch

from .attention import attention_function


class CrossAttentionPatch:
    def __init__(self, weight, cond, uncond, sigma_start=999.0, sigma_end=0.0):
        self.weights, self.conds, self.unconds = [weight], [cond], [uncond]
        self.sigma_start, self.sigma_end = [sigma_start], [sigma_end]
        self.number = 0  # not per unit: never filtered

    def set_new_condition(self, weight, cond, uncond, sigma_start=999.0, sigma_end=0.0):
        self.weights.append(weight)
        self.conds.append(cond)
        self.unconds.append(uncond)
        self.sigma_start.append(sigma_start)
        self.sigma_end.append(sigma_end)

    def __call__(self, q, k, v, extra_options):
        marks = extra_options["cond_or_uncond"]
        per_chunk = q.shape[0] // len(marks)
        out = attention_function(q, k, v, extra_options["n_heads"])
        for weight, cond, uncond in zip(self.weights, self.conds, self.unconds):
            term = torch.cat([torch.full((per_chunk, 1, 1), (cond, uncond)[m] * weight) for m in marks])
            out = out + term.to(out)
        return out


def apply(unet_patcher, blocks, **entry) -> None:
    """One IP-Adapter unit on ``unet_patcher`` (a clone): a new patch per block, or the next entry of the one there."""
    replace = unet_patcher.model_options.setdefault("transformer_options", {}).setdefault("patches_replace", {})
    attn2 = replace.setdefault("attn2", {})
    for key in blocks:
        if key in attn2:
            attn2[key].set_new_condition(**entry)
        else:
            attn2[key] = CrossAttentionPatch(**entry)
