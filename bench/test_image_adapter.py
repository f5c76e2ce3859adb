"""Image adapter mm_vision_projector: Linear(1024, 4096) -> GELU -> Linear(4096, 4096) on
B*576 frozen CLIP tokens. Target (reported, not asserted): >= 85% of the measured bf16
matmul rate."""
from bench.branches import parametrize_variants, run_branch
from bench.conftest import RELEASE_BATCHES


@parametrize_variants
def test_image_adapter(benchmark, fg, variant, mode, batch):
    run_branch(benchmark, fg, "image_adapter", variant, mode, batch, cpu_ok=False,
               smallest_batch=RELEASE_BATCHES[0])
