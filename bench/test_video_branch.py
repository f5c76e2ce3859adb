"""Video branch: temporal position encoding + video Q-Former + llama_proj, from frame
features (B, 64 frames, 32 queries, 768). Target (reported, not asserted): fwd+bwd of the
fast path >= 4x eager and >= 1.5x torch.compile at batch 8."""
import pytest

from bench.branches import parametrize_variants, run_branch
from bench.conftest import RELEASE_BATCHES


@pytest.mark.fg_cpu
@parametrize_variants
def test_video_branch(benchmark, fg, variant, mode, batch):
    run_branch(benchmark, fg, "video_branch", variant, mode, batch, cpu_ok=True,
               smallest_batch=RELEASE_BATCHES[0])
