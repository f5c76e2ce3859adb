"""Every configuration the cross-attention launchers pick at the groundinggpt-7b shapes
compiles for sm_80 and sm_90, fits the chip's shared memory and does not spill registers.

The configurations are not listed by hand: the real launchers run on "meta" tensors inside
`record_launches`, which collects each launch (kernel, constexprs, warps, stages and the
argument specialisation Triton's JIT would make) instead of running it. No GPU needed.
(The fused-linear kernels have their own file, test_kernels_aot_linear.py.)
"""
from __future__ import annotations

import pytest
import torch

from fastground.config import GroundingGPTConfig
from fastground.kernels import aot, runtime
from fastground.kernels.cross_attention import attention, attention_dropout_mask
from fastground.kernels.kv_proj_pe import kv_proj_pe
from aot_checks import assert_fits_chip, assert_no_spills, unique_launches

CCS = (80, 90)
SMS = {80: 108, 90: 132}  # A100, H100 SXM: split heuristics depend on the SM count
BATCH = 8  # per-GPU batch of the release's stage 1 (64 over 8 GPUs)


def _meta(*shape, dtype, grad=True):
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)


def _cross_attention_layer(B, Lq, Lenc, enc_width, rows_per_pos, num_pos, max_pos, heads, dtype,
                           train, masked=False, seed=1):
    """One Q-Former cross-attention as the fast path runs it (K/V with PE, attention),
    forward and, when training, backward; plus the self-attention over the queries."""
    hidden = heads * 64
    x = _meta(B, Lenc, enc_width, dtype=dtype, grad=train)
    pe = _meta(max_pos, enc_width, dtype=dtype, grad=train)
    w = [_meta(hidden, enc_width, dtype=dtype, grad=train) for _ in range(2)]
    b = [_meta(hidden, dtype=dtype, grad=train) for _ in range(2)]
    k, v = kv_proj_pe(x, pe, rows_per_pos, num_pos, w[0], b[0], w[1], b[1])
    q = _meta(B, Lq, hidden, dtype=dtype, grad=train)
    split = lambda t: t.view(B, t.shape[1], heads, 64).transpose(1, 2)
    mask = torch.ones(B, Lenc, dtype=torch.long, device="meta") if masked else None
    out = attention(split(q), split(k), split(v), mask, dropout_p=0.1, training=train, seed=seed)
    qs = _meta(B, Lq, 3 * hidden, dtype=dtype, grad=train)
    out_self = attention(*[split(t) for t in qs.split(hidden, dim=-1)], dropout_p=0.1, training=train, seed=2)
    if train:
        (out.float().sum() + out_self.float().sum()).backward()


def _frame_qformer(cfg, frames, dtype):
    """The frozen BLIP-2 frame Q-Former as the fast path runs it (inference only): K/V of its
    cross-attention layers (every `qformer_cross_attention_freq`-th of `qformer_num_layers`) in
    one projection of the EVA tokens (width 1408, 257 per frame), then 32 queries over them."""
    heads, hidden = cfg.qformer_num_heads, cfg.qformer_hidden_size
    n_cross = len(range(0, cfg.qformer_num_layers, cfg.qformer_cross_attention_freq))
    tokens = (cfg.eva_image_size // cfg.eva_patch_size) ** 2 + 1
    x = _meta(frames, tokens, cfg.eva_width, dtype=dtype, grad=False)
    pe = _meta(1, cfg.eva_width, dtype=dtype, grad=False)
    w = [_meta(n_cross * hidden, cfg.eva_width, dtype=dtype, grad=False) for _ in range(2)]
    b = [_meta(n_cross * hidden, dtype=dtype, grad=False) for _ in range(2)]
    with torch.no_grad():
        k, v = kv_proj_pe(x, pe, 1, 1, w[0], b[0], w[1], b[1])
        q = _meta(frames, cfg.num_query_token, hidden, dtype=dtype, grad=False)
        split = lambda t: t[..., :hidden].view(frames, t.shape[1], heads, 64).transpose(1, 2)
        attention(split(q), split(k), split(v))
        qs = _meta(frames, cfg.num_query_token, 3 * hidden, dtype=dtype, grad=False)
        attention(*[split(t) for t in qs.split(hidden, dim=-1)])
    return tokens


def _release_launches() -> list[aot.Launch]:
    cfg = GroundingGPTConfig.from_preset("groundinggpt-7b")
    heads = cfg.qformer_num_heads
    video = dict(Lq=cfg.video_token_len, Lenc=cfg.num_frames * cfg.num_query_token,
                 enc_width=cfg.qformer_hidden_size, rows_per_pos=cfg.num_query_token,
                 num_pos=cfg.num_frames, max_pos=cfg.max_frame)
    audio = dict(Lq=cfg.sound_token_len, Lenc=cfg.num_audio_clips, enc_width=cfg.audio_out_dim,
                 rows_per_pos=1, num_pos=cfg.num_audio_clips, max_pos=cfg.audio_position_embeddings)
    launches = []
    for cc in CCS:
        with aot.record_launches(num_sms=SMS[cc]) as rec:
            for dtype in (torch.bfloat16, torch.float32):
                for branch in (video, audio):
                    for train in (True, False):
                        _cross_attention_layer(BATCH, heads=heads, dtype=dtype, train=train, **branch)
                _cross_attention_layer(BATCH, heads=heads, dtype=dtype, train=True, masked=True, **video)
                _cross_attention_layer(1, heads=heads, dtype=dtype, train=False, **video)  # B=1 inference
                # the frozen frame Q-Former over every frame of a batch, and of one video
                for frames in (BATCH * cfg.num_frames, cfg.num_frames):
                    _frame_qformer(cfg, frames, dtype)
                # dropout keys read from the device, as under CUDA-graph capture (SEED_PTR)
                with runtime.device_seeds():
                    _cross_attention_layer(BATCH, heads=heads, dtype=dtype, train=True, seed=None, **video)
                # more queries than one block (video_token_len > 64): the separate delta launch
                _cross_attention_layer(BATCH, heads=heads, dtype=dtype, train=True, **dict(video, Lq=96))
            # fp32 with torch's TF32 switch on: the kernels follow it (PRECISION="tf32")
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                for branch in (video, audio):
                    _cross_attention_layer(BATCH, heads=heads, dtype=torch.float32, train=True, **branch)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev
            attention_dropout_mask(1, BATCH, heads, cfg.video_token_len, 2048, 0.1, device="meta")
        launches += rec
    return unique_launches(launches)


@pytest.fixture(scope="module")
def compiled():
    launches = _release_launches()
    jobs = [launch.job(cc) for launch in launches for cc in CCS]
    results = aot.compile_many(jobs, keep_asm=True)
    rows = []
    for job, (c, smem) in zip(jobs, results):
        usage = aot.resource_usage(c)
        consts = {k: v for k, v in job.constexprs.items() if k.isupper() or k.startswith("BLOCK")}
        rows.append(dict(kernel=c.name, cc=job.cc, smem=smem, warps=job.num_warps, stages=job.num_stages,
                         consts=consts, **usage))
    return rows


def test_frame_qformer_shapes_are_the_release_ones():
    cfg = GroundingGPTConfig.from_preset("groundinggpt-7b")
    with aot.record_launches() as rec:
        tokens = _frame_qformer(cfg, 1, torch.bfloat16)
    assert (cfg.num_query_token, cfg.eva_width, tokens) == (32, 1408, 257)
    kv = [r for r in rec if r.kernel.fn.__name__ == "_kv_fwd_kernel"]
    assert len(kv) == 1 and kv[0].args[-10:-8] == (1408, 6 * 768)  # din, K/V of all 6 cross layers


def test_release_plan_covers_every_kernel():
    names = {launch.kernel.fn.__name__ for launch in _release_launches()}
    assert names == {"_kv_fwd_kernel", "_kv_bwd_dx_kernel", "_pos_sum_kernel", "_kv_bwd_dw_kernel",
                     "_sum_partials_kernel", "_attn_fwd_kernel", "_attn_combine_kernel",
                     "_attn_bwd_delta_kernel", "_attn_bwd_kernel", "_dropout_mask_kernel"}


@pytest.mark.parametrize("cc", CCS)
def test_shared_memory_fits(compiled, cc):
    assert_fits_chip(compiled, cc)


@pytest.mark.parametrize("cc", CCS)
def test_no_register_spills(compiled, cc):
    assert_no_spills(compiled, cc)
