"""One full training step of a 7B-wide slice: the release's trainable branches (image
adapter, video branch, audio branch) plus 2 Vicuna-7B-sized decoder layers, the final norm,
lm_head and the loss, then backward and an AdamW update (bf16 weights and states).

Every sample carries one image (576 CLIP tokens), one video (64 frames of frame features)
and one sound (3 clips), then text up to the sequence length; the loss is on the second
half of the text. The forward is GroundingGPT.forward itself with the frozen encoders
stepped over (the encode_* hooks take the features directly). Stage 3 (batch 8) and 2
(batch 16) train LLM + adapters at 2048 tokens; stage 1 (batch 64) the adapters only, at
1024 tokens. No gradient checkpointing (the release uses it to fit 32 layers; 2 fit).
MFU is model FLOPs (bench/floors.py train_step) over time over the measured matmul rate.
"""
import pytest
import torch

from bench import floors, harness
from fastground.model.stages import set_stage

N_INPUT_SETS = 2
LR = {1: 1e-3, 2: 2e-5, 3: 2e-5}


def slice_shape(cfg) -> floors.SliceShape:
    from bench.branches import qformer_shape
    return floors.SliceShape(
        llama=floors.LlamaShape(hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
                                kv_heads=cfg.num_key_value_heads, intermediate=cfg.intermediate_size,
                                vocab=cfg.vocab_size),
        layers=cfg.num_hidden_layers, image_tokens=cfg.image_token_len, clip_width=cfg.clip_hidden_size,
        frames=cfg.num_frames, queries_per_frame=cfg.num_query_token, video=qformer_shape(cfg, "video"),
        clips=cfg.num_audio_clips, audio=qformer_shape(cfg, "audio"), video_pe_rows=cfg.max_frame,
        audio_pe_rows=cfg.audio_position_embeddings)


def make_batch(fg, batch, seq, seed):
    from fastground.testing import media_block
    cfg = fg.cfg
    g = torch.Generator().manual_seed(seed)
    head = [cfg.bos_token_id] + media_block(cfg, "image") + media_block(cfg, "video") + media_block(cfg, "sound")
    n_text = seq - len(head)
    assert n_text >= 8, f"sequence {seq} too short for the media blocks ({len(head)} tokens)"
    text = torch.randint(3, cfg.vocab_size - 9, (batch, n_text), generator=g)
    ids = torch.cat([torch.tensor(head).expand(batch, -1), text], dim=1)
    labels = torch.full_like(ids, -100)
    answer = len(head) + n_text // 2
    labels[:, answer:] = ids[:, answer:]
    s = seed * 10
    return (ids.to(fg.device), labels.to(fg.device),
            fg.randn(batch, cfg.image_token_len, cfg.clip_hidden_size, seed=s + 1),
            fg.randn(batch, cfg.num_frames, cfg.num_query_token, cfg.qformer_hidden_size, seed=s + 2),
            fg.randn(batch, cfg.num_audio_clips, cfg.audio_out_dim, seed=s + 3))


class FeatureHooks:
    """Point encode_images/videos/sounds at the trainable halves, so GroundingGPT.forward
    takes frozen-encoder features in place of pixels and waveforms. Late-bound, so a
    patched branch is what runs."""

    NAMES = ("encode_images", "encode_videos", "encode_sounds")

    def __init__(self, model):
        self.m = model.model

    def __enter__(self):
        m = self.m
        self.saved = {n: m.__dict__[n] for n in self.NAMES if n in m.__dict__}
        m.encode_images = lambda x: m.mm_vision_projector(x)
        m.encode_videos = lambda x: m.video_branch(x)
        m.encode_sounds = lambda x: m.audio_branch(x)
        return self

    def __exit__(self, *exc):
        for n in self.NAMES:
            self.m.__dict__.pop(n, None)
        self.m.__dict__.update(self.saved)


@pytest.mark.parametrize("variant", ("eager", "compile", "fast"))
def test_train_step(benchmark, fg, variant, train_case):
    stage, batch, seq = train_case
    fg.require(cpu_ok=False)
    if variant == "compile":
        fg.require_compile()
        if fg.gpu and not fg.full:
            pytest.skip("torch.compile of the training step is timed with --fg-full only (minutes of compilation)")
    if variant == "fast":
        harness.require_fast(fg)
    model = fg.model()
    cfg = fg.cfg
    inputs = [make_batch(fg, batch, seq, seed=i + 1) for i in range(N_INPUT_SETS)]
    cost = floors.train_step(batch, seq, slice_shape(cfg), stage=stage, itemsize=fg.itemsize,
                             state_itemsize=fg.itemsize)
    info = harness.CaseInfo(bench="train_step", variant=variant, mode=f"step (stage {stage})", batch=batch,
                            shape=f"{batch}x{seq} tokens, {cfg.num_hidden_layers} layers",
                            dtype=str(fg.dtype).replace("torch.", ""), cost=cost, items_per_call=batch)

    def loss_of(ids, labels, img, frames, clips):
        return model(ids, labels=labels, images=img, videos=frames, sounds=clips).loss

    def body():
        trainable = set_stage(model, stage)
        model.train()
        # the fast engine's answer-only fused loss (the trainer's --fused-loss); the reference
        # computes lm_head on every position and fp32 cross-entropy
        model.fused_loss = variant == "fast"
        try:
            with FeatureHooks(model), harness.Variant(fg, model, variant, loss_of) as f:
                params = [p for p in model.parameters() if p.requires_grad]
                opt = torch.optim.AdamW(params, lr=LR[stage], weight_decay=0.0,
                                        **({"fused": True} if fg.gpu else {"foreach": True}))

                def step(*batch_tensors):
                    f(*batch_tensors).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                fig = harness.run_case(benchmark, fg, info, step, inputs, warmup=3, extra={
                    "stage": stage, "seq": seq, "trainable_params": sum(p.numel() for p in trainable.values()),
                    "tokens_per_s": None,
                    # equal-length rows: computed / real tokens is 1 for every variant here
                    "padding_waste": 1.0})
                fig["tokens_per_s"] = batch * seq / (fig["time_ms"] / 1e3)
                benchmark.extra_info.update(fig)
                del opt
        finally:
            model.fused_loss = False
            set_stage(model, 2)
            model.zero_grad(set_to_none=True)

    harness.oom_guard(fg, body)
    del inputs
    harness.free_memory(fg.device)

