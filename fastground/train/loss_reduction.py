"""How an optimizer step's loss averages its tokens: `--loss-reduction {token,release}`.

token (default): the mean over every supervised token of the global batch (all ranks, all
    micro-batches), as if the global batch were one forward pass. A token of a short answer
    weighs as much as one of a long answer.
release: what the release's HF Trainer + DeepSpeed compute: each forward's (micro-batch's)
    mean over its supervised tokens, then the mean of those means over the micro-batches
    and the ranks. A micro-batch with few supervised tokens weighs as much as one with many.

Both are expressed as one weight per micro-batch, applied to its summed token loss; the
data-parallel gradient average over the ranks (ZeRO's, which divides by the world size) is
part of the arithmetic:

    step loss = (1 / world) * sum over ranks and micro-batches of weight * summed token loss

token: weight = world / (supervised tokens of the global batch);
release: weight = 1 / (micro-batches per rank * supervised tokens of this micro-batch).

A micro-batch without any supervised token contributes 0 under `release` and still counts
in the number of micro-batches (the release's mean of an empty micro-batch would be NaN).
"""
from __future__ import annotations

LOSS_REDUCTIONS = ("token", "release")
DEFAULT_LOSS_REDUCTION = "token"


def micro_batch_weight(reduction: str, tokens: int, step_tokens: float, world_size: int,
                       micro_batches: int) -> float:
    """Weight of one micro-batch's summed token loss.

    tokens: supervised tokens of this micro-batch; step_tokens: of the whole global batch;
    micro_batches: micro-batches per rank in this step (the gradient accumulation)."""
    if reduction == "token":
        return world_size / max(step_tokens, 1.0)
    if reduction == "release":
        return 1.0 / (micro_batches * tokens) if tokens > 0 else 0.0
    raise ValueError(f"unknown loss reduction {reduction!r}; choose one of {', '.join(LOSS_REDUCTIONS)}")


def step_loss(weighted_sums: float, world_size: int) -> float:
    """The step's loss from the sum over all ranks of weight * summed token loss."""
    return weighted_sums / world_size


def check_packing(reduction: str, packed: bool | None) -> bool | None:
    """`release` averages the means of the release's micro-batches (--micro-batch samples
    each, padded), which packed micro-batches (a token budget each) are not: packing is off
    by default with it and an error when asked for."""
    if reduction != "release":
        return packed
    if packed:
        raise ValueError("--loss-reduction release averages the means of padded micro-batches of "
                         "--micro-batch samples, as the release's trainer forms them; --packed "
                         "micro-batches differ. Use --no-packed (the default with release)")
    return False
