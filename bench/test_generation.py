"""Generation throughput (samples/s) at batch 1 vs 32: one image question per sample, the
prompt prefilled with its image through the branch, then a fixed number of greedy tokens
through the KV cache (EOS disabled, so every sample generates the same count). On a GPU the
7B-wide slice model in bf16 (release widths, 2 layers); on CPU the tiny preset in fp32.
Reported, never asserted. Target of issue 11: RefCOCO val (~10.8k expressions, ~30 answer
tokens each) in under 10 minutes on one H100, i.e. >= 18 samples/s with the full 7B."""
import pytest
import torch

from bench import harness

NEW_TOKENS = 32


def _prompts(cfg, batch: int, g: torch.Generator):
    from fastground.testing import media_block, media_tensor

    rows = []
    for i in range(batch):
        # different question lengths, so the batch is really left padded
        words = torch.randint(3, cfg.vocab_size - 9, (8 + (i % 7),), generator=g).tolist()
        rows.append([cfg.bos_token_id] + words[:3] + media_block(cfg, "image") + words[3:])
    return rows, media_tensor(cfg, "image", batch, g)


@pytest.mark.fg_cpu
@pytest.mark.parametrize("gen_batch", (1, 32), ids=lambda b: f"b{b}")
def test_generation_throughput(benchmark, fg, gen_batch):
    model = fg.model().eval()
    cfg = fg.cfg
    g = torch.Generator().manual_seed(gen_batch)
    rows, images = _prompts(cfg, gen_batch, g)
    images = images.to(device=fg.device, dtype=fg.dtype)

    def run(rows, images):
        out = model.generate(rows, images=images, max_new_tokens=NEW_TOKENS, eos_token_id=None)
        assert out.new_tokens == NEW_TOKENS * len(rows)
        return out

    prompt_len = max(map(len, rows))
    info = harness.CaseInfo(bench="generate", variant=model.model.config._attn_implementation, mode="generate",
                            batch=gen_batch, shape=f"prompt <= {prompt_len} tokens (1 image), {NEW_TOKENS} new",
                            dtype=str(fg.dtype).replace("torch.", ""), cost=None, items_per_call=gen_batch)
    fig = harness.run_case(benchmark, fg, info, run, [(rows, images)], warmup=1,
                           rounds=3 if not fg.gpu else None,
                           extra={"new_tokens_per_sample": NEW_TOKENS})
    fig["tokens_per_s"] = gen_batch * NEW_TOKENS / (fig["time_ms"] / 1e3)
    benchmark.extra_info["tokens_per_s"] = fig["tokens_per_s"]
