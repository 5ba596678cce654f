"""``backend.attention.attention_function(q, k, v, heads, mask=None)``: projected [b, n, heads·d] in and out."""
import torch.nn.functional as F


def attention_function(q, k, v, heads, mask=None):
    b, n, c = q.shape
    split = [t.view(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*split, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, c)
