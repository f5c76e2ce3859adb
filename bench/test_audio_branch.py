"""Audio branch: clip position encoding + audio Q-Former + audio_llama_proj, from clip
features (B, 3 clips, 1024)."""
from bench.branches import parametrize_variants, run_branch
from bench.conftest import RELEASE_BATCHES


@parametrize_variants
def test_audio_branch(benchmark, fg, variant, mode, batch):
    run_branch(benchmark, fg, "audio_branch", variant, mode, batch, cpu_ok=False,
               smallest_batch=RELEASE_BATCHES[0])
