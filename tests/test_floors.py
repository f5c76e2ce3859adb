"""bench/floors.py against counts worked by hand, and its parameter counts against the
real modules."""
import sys
from pathlib import Path

import pytest
import torch

try:
    from bench import floors
except ImportError:  # plain `pytest` does not put the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import floors

from fastground import GroundingGPT, GroundingGPTConfig


def test_single_linear_by_hand():
    m, n, k = 4, 3, 5
    c = floors.linear(m, n, k, itemsize=2)
    assert c.flops == 2 * m * n * k == 120
    assert c.bytes == (m * k + n * k + m * n) * 2 == 94
    # backward: dX (2MNK) and dW (2MNK); reads dY, X, W; writes dX, dW
    cb = floors.linear(m, n, k, itemsize=2, backward=True)
    assert cb.flops == 3 * 120
    assert cb.bytes == 94 + (m * n + m * k + n * k + m * k + n * k) * 2
    # a frozen input needs no dX
    assert floors.linear(m, n, k, backward=True, input_grad=False).flops == 2 * 120


def test_floor_picks_the_larger_term():
    c = floors.Cost(flops=1e12, bytes=1e9)
    assert c.floor_s(1e15, 1e12) == pytest.approx(1e-3)      # 1 ms each
    assert c.floor_s(2e15, 1e12) == pytest.approx(1e-3) and c.bound(2e15, 1e12) == "memory"
    assert c.floor_s(1e15, 2e12) == pytest.approx(1e-3) and c.bound(1e15, 2e12) == "compute"


def test_causal_pairs_by_enumeration():
    for s_q, s_k in [(1, 1), (4, 4), (3, 7), (7, 3), (16, 16)]:
        brute = sum(1 for i in range(s_q) for j in range(s_k) if j <= s_k - s_q + i)
        assert floors.causal_pairs(s_q, s_k) == brute
    # square causal: s(s+1)/2 pairs, attention FLOPs 4 * b * h * pairs * d
    assert floors.attention(2, 3, 4, 4, 8, causal=True).flops == 4 * 2 * 3 * 10 * 8


def test_video_branch_tiny_by_hand():
    # b=1 video, t=2 frames x q=2 queries per frame (4 keys), hidden 4 (1 head), FFN 8,
    # 1 layer, 3 video queries, projection to 5.
    s = floors.QFormerShape(hidden=4, heads=1, intermediate=8, layers=1, encoder_width=4, queries=3,
                            out_features=5)
    c = floors.video_branch(1, frames=2, queries_per_frame=2, s=s, itemsize=2)
    self_qkvo = 4 * (2 * 3 * 4 * 4)          # 384
    self_attn = 2 * (2 * 3 * 3 * 4)          # QK^T and PV over 3 queries: 144
    cross_qo = 2 * (2 * 3 * 4 * 4)           # 192
    cross_kv = 2 * (2 * 4 * 4 * 4)           # K and V over the 4 keys: 256
    cross_attn = 2 * (2 * 3 * 4 * 4)         # 192
    ffn = 2 * 3 * 4 * 8 + 2 * 3 * 8 * 4      # 384
    proj = 2 * 3 * 4 * 5                     # 120
    fwd = self_qkvo + self_attn + cross_qo + cross_kv + cross_attn + ffn + proj
    assert fwd == 1672
    assert c.flops == fwd
    elems = (1 * 2 * 2 * 4                   # frame features
             + 2 * 4                         # the 2 position-embedding rows used
             + 3 * 4                         # video query tokens
             + 2 * 4                         # embeddings LayerNorm
             + (4 * (16 + 4) + 8)            # self-attention q, k, v, o + LayerNorm
             + (4 * (16 + 4) + 8)            # cross-attention q, o, k, v (encoder width 4) + LayerNorm
             + (4 * 8 + 8 + 8 * 4 + 4 + 8)   # FFN + LayerNorm
             + (4 * 5 + 5)                   # llama_proj
             + 1 * 3 * 5)                    # output
    assert elems == 344
    assert c.bytes == 2 * elems

    cb = floors.video_branch(1, frames=2, queries_per_frame=2, s=s, itemsize=2, backward=True)
    bwd = (2 * (self_qkvo + cross_qo + ffn + proj)   # dX and dW on the query path
           + 2 * (self_attn + cross_attn)            # dV, dP, dQ, dK
           + cross_kv                                # dW of K and V (the features are frozen)
           + 2 * (2 * 2 * 4 * 4))                    # gradient to the 2 PE rows, reduced before K and V
    assert bwd == 3216
    assert cb.flops == fwd + bwd
    params = elems - 16 - 15                         # everything but features and output
    # backward pass: read dY (15), re-read features (16) and parameters, write parameter grads
    assert cb.bytes == 2 * (elems + 15 + 16 + params + params) == 2002


def test_adapter_backward_skips_the_frozen_input():
    t = 10
    c = floors.image_adapter(t, 3, 5, 7, backward=True)
    fc1, fc2 = 2 * t * 5 * 3, 2 * t * 7 * 5
    assert c.flops == (fc1 + fc2) + fc1 + 2 * fc2


def test_decoder_layer_is_twice_the_parameters_per_token():
    s = floors.LlamaShape()
    assert floors.decoder_layer_params(s) == 4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096
    c = floors.decoder_layer(1, 1, s)
    assert c.flops == 2 * (4 * 4096 ** 2 + 3 * 4096 * 11008) + 4 * 32 * 1 * 128
    # training: dX and dW double the linear work; frozen weights drop dW
    lin = 2 * (4 * 4096 ** 2 + 3 * 4096 * 11008) * 8
    att = floors.attention(1, 32, 8, 8, 128, causal=True).flops
    assert floors.decoder_layer(1, 8, s, backward=True).flops == 3 * lin + 3 * att
    assert floors.decoder_layer(1, 8, s, backward=True, weight_grad=False).flops == 2 * lin + 3 * att


def _count(model, prefixes):
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))


@pytest.mark.parametrize("preset", ["tiny", "groundinggpt-7b"])
def test_parameter_counts_match_the_modules(preset):
    cfg = GroundingGPTConfig.from_preset(preset)
    with torch.device("meta"):
        m = GroundingGPT(cfg)
    video = floors.QFormerShape(hidden=cfg.qformer_hidden_size, heads=cfg.qformer_num_heads,
                                intermediate=cfg.qformer_intermediate_size, layers=cfg.video_qformer_layers,
                                encoder_width=cfg.qformer_hidden_size, queries=cfg.video_token_len,
                                out_features=cfg.hidden_size)
    audio = floors.QFormerShape(hidden=cfg.qformer_hidden_size, heads=cfg.qformer_num_heads,
                                intermediate=cfg.qformer_intermediate_size, layers=cfg.audio_qformer_layers,
                                encoder_width=cfg.audio_out_dim, queries=cfg.sound_token_len,
                                out_features=cfg.hidden_size)
    # the whole position-embedding table is max_frame / audio_position_embeddings rows
    assert floors.qformer_branch_params(video, cfg.max_frame) == _count(
        m, ("model.video_Qformer.", "model.video_query_tokens", "model.video_frame_position_embedding.",
            "model.llama_proj."))
    assert floors.qformer_branch_params(audio, cfg.audio_position_embeddings) == _count(
        m, ("model.audio_Qformer.", "model.audio_query_tokens", "model.audio_position_embedding.",
            "model.audio_llama_proj."))
    assert floors.adapter_params(cfg.clip_hidden_size, cfg.hidden_size, cfg.hidden_size) == _count(
        m, ("model.mm_vision_projector.",))
    llama = floors.LlamaShape(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                              cfg.intermediate_size, cfg.vocab_size)
    assert floors.decoder_layer_params(llama) == _count(m, ("model.layers.0.",))
    # what the optimizer updates in each stage
    from fastground.model.stages import trainable_parameters
    shape = floors.SliceShape(llama=llama, layers=cfg.num_hidden_layers, clip_width=cfg.clip_hidden_size,
                              video=video, audio=audio, video_pe_rows=cfg.max_frame,
                              audio_pe_rows=cfg.audio_position_embeddings)
    for stage in (1, 2, 3):
        assert floors.slice_params(shape, stage) == sum(p.numel() for p in trainable_parameters(m, stage).values())


def test_release_video_branch_magnitude():
    # batch 8 at the release shape: the two cross-attention K/V projections over
    # 8 x 2048 keys dominate (2 layers x 2 x 2 * 16384 * 768 * 768 = 77.3 GFLOP)
    c = floors.video_branch(8)
    kv = 2 * 2 * 2 * 8 * 2048 * 768 * 768
    assert kv / c.flops > 0.7
    assert 90e9 < c.flops < 120e9
