"""Answer-only linear cross-entropy: lm_head and the loss in one autograd Function, chunked.

Training needs the loss of the answer tokens only (about 8% of a GroundingGPT batch), so the
caller hands over the hidden states of those positions, (N, H), and never the (tokens x vocab)
logits. Rows go through lm_head `rows` at a time; the forward keeps only each row's
log-sum-exp (N fp32 values), and the backward recomputes a chunk's logits to form its softmax
gradient, so no (N x V) tensor exists either: that costs one more (N x H x V) GEMM, small next
to the backbone's (N is the answer tokens, not the batch).

Extra peak memory, beyond the inputs and the gradients autograd needs anyway:
    forward:  rows x V x (2 + 4 + 4) bytes  (the chunk's logits in the input dtype, in fp32,
              and logsumexp's fp32 temporary), plus N x 4 bytes of saved log-sum-exp;
    backward: rows x V x (2 + 4) bytes      (fp32 logits turned in place into the softmax
              gradient, then cast to the input dtype for the two GEMMs).
`rows` defaults to the largest count whose fp32 chunk fits CHUNK_BYTES (64 MiB): 512 rows at
Vicuna's 32,000-token vocabulary, so the whole overhead stays under ~320 MiB whatever N is.
The weight gradient accumulates chunk by chunk in the weight's dtype (as a plain lm_head
backward would hand it to the optimizer).

On a GPU the two GEMMs per chunk are cuBLAS calls (they are 97% of the work); the elementwise
softmax-gradient steps are torch ops on the chunk. The same code runs on CPU.
"""
from __future__ import annotations

import torch

CHUNK_BYTES = 64 * 2**20


def default_rows(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab))


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One chunk through lm_head, in fp32. The only place lm_head is applied (tests count
    its rows)."""
    out = h @ weight.t()
    if bias is not None:
        out = out + bias
    return out.float()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, rows: int):
        n = h.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for a in range(0, n, rows):
            b = min(n, a + rows)
            logits = _logits(h[a:b], weight, bias)
            lse[a:b] = torch.logsumexp(logits, dim=-1)
            total += (lse[a:b] - logits.gather(1, targets[a:b, None]).squeeze(1)).sum()
            del logits
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.rows = rows
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h, weight, bias, targets, lse = ctx.saved_tensors
        rows = ctx.rows
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b and bias is not None else None
        n = h.shape[0]
        for a in range(0, n, rows):
            b = min(n, a + rows)
            g = _logits(h[a:b], weight, bias)
            # d(lse - z_t)/dz = softmax(z) - onehot(t), in place on the fp32 logits
            g.sub_(lse[a:b, None]).exp_()
            g[torch.arange(b - a, device=g.device), targets[a:b]] -= 1.0
            g.mul_(grad_total)
            g = g.to(h.dtype)
            if grad_h is not None:
                torch.mm(g, weight, out=grad_h[a:b])
            if grad_w is not None:
                grad_w.addmm_(g.t(), h[a:b])
            if grad_b is not None:
                grad_b += g.sum(0, dtype=torch.float32).to(grad_b.dtype)
            del g
        return grad_h, grad_w, grad_b, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, rows: int | None = None) -> torch.Tensor:
    """Sum over the N rows of cross_entropy(h @ weight.T + bias, targets), as an fp32 scalar,
    with gradients for h, weight and bias. h (N, H), weight (V, H), targets (N,) int64 in
    [0, V). N = 0 gives a zero that still carries (zero) gradients to h and weight, so every
    rank's gradient hooks fire alike."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: h {tuple(h.shape)} and weight {tuple(weight.shape)} "
                         "must be (N, H) and (V, H)")
    if targets.shape != (h.shape[0],):
        raise ValueError(f"linear_cross_entropy: {targets.shape[0]} targets for {h.shape[0]} rows")
    rows = rows or default_rows(weight.shape[0])
    return _LinearCrossEntropy.apply(h, weight, bias, targets.long(), int(rows))


def reference_linear_cross_entropy(h, weight, targets, bias=None) -> torch.Tensor:
    """The unfused computation: all logits, fp32 cross-entropy, summed."""
    logits = torch.nn.functional.linear(h, weight, bias).float()
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
