"""Mamba2's state-space scan in plain PyTorch: the chunked state-space-dual (SSD) algorithm, and the step-by-step
recurrence it computes (the test oracle).

The scan (one group: every head reads the same B and C) maps, for each head, inputs x_t (headdim values), log
decays a_t, and the shared B_t, C_t (d_state values) to

    h_t = exp(a_t) h_{t-1} + x_t B_t^T,    y_t = h_t C_t,    h_0 = 0.

Mamba2 calls it with x = dt * x and a = dt * A. The chunked form (Dao and Gu, "Transformers are SSMs", 2024,
Sec. 6) cuts the sequence into chunks of `chunk_size`: inside a chunk the outputs are a masked quadratic form
(attention-like, decays as the mask); chunk to chunk only the d_state x headdim states pass, so the cost is
linear in the length. It runs on any device and differentiates with autograd; its products are two-operand
einsums (matmuls), whose FLOPs `matvit.mamba` counts; a sequence of one chunk skips the chunk-to-chunk part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decays(cum: torch.Tensor) -> torch.Tensor:
    """(..., T) cumulative log decays -> (..., T, T): entry [i, j] is exp(a_{j+1} + ... + a_i) for j <= i (1 on the
    diagonal), 0 above it; taken as exp(cum_i - cum_j), as Mamba2's kernels do inside a chunk."""
    t = cum.size(-1)
    upper = ~torch.tril(torch.ones(t, t, dtype=torch.bool, device=cum.device))
    return torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(upper, float("-inf")))


def chunked(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """The scan of x (batch, length, heads, headdim), a (batch, length, heads), b and c (batch, length, d_state),
    computed chunk by chunk; any length (the last chunk is padded, which a causal scan's earlier outputs never
    see). Returns y shaped as x."""
    batch, length, heads, headdim = x.shape
    q = min(chunk_size, length)
    pad = -length % q
    if pad:  # zero inputs, zero decays: the padded steps come after every real one and are cut off below
        x, a, b, c = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, a, b, c))
    n = (length + pad) // q
    x = x.reshape(batch, n, q, heads, headdim)
    b, c = b.reshape(batch, n, q, -1), c.reshape(batch, n, q, -1)
    a = a.reshape(batch, n, q, heads).permute(0, 3, 1, 2)  # (batch, heads, chunks, q)
    cum = a.cumsum(-1)

    # Inside each chunk: y_l = sum_{s <= l} (C_l . B_s) exp(a_{s+1} + ... + a_l) x_s.
    scores = c @ b.transpose(-1, -2)  # (batch, chunks, l, s)
    y = torch.einsum("bhcls,bcshp->bclhp", scores[:, None] * decays(cum), x)  # weights: (batch, heads, chunks, l, s)
    if n == 1:
        return y.reshape(batch, q, heads, headdim)[:, :length]

    # Each chunk's own end state (what its inputs leave, decayed to the chunk's end): (batch, chunks, heads, p, n).
    decay_to_end = torch.exp(cum[..., -1:] - cum).permute(0, 2, 3, 1)  # (batch, chunks, q, heads)
    states = torch.einsum("bcln,bclhp->bchpn", b, x * decay_to_end[..., None])

    # Chunk to chunk: the state entering chunk k is the decayed sum of the end states of chunks before it.
    carry = decays(cum[..., -1].cumsum(-1))  # [k, j]: the decay over chunks j+1..k
    ends = torch.einsum("bhkj,bjhpn->bkhpn", carry, states)  # the state at the end of chunk k ...
    entering = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], dim=1)  # ... enters chunk k + 1

    # The entering state's contribution inside each chunk: C_l . (decay from the chunk's start to l) h.
    y = y + torch.einsum("bcln,bchpn->bclhp", c, entering) * torch.exp(cum).permute(0, 2, 3, 1)[..., None]
    return y.reshape(batch, n * q, heads, headdim)[:, :length]


def recurrence(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The same scan one step at a time (slow; the definition the chunked form is tested against)."""
    batch, length, heads, headdim = x.shape
    h = x.new_zeros(batch, heads, headdim, b.size(-1))
    ys = []
    for t in range(length):
        h = torch.exp(a[:, t])[..., None, None] * h + x[:, t, :, :, None] * b[:, t, None, None, :]
        ys.append(torch.einsum("bhpn,bn->bhp", h, c[:, t]))
    return torch.stack(ys, dim=1)
