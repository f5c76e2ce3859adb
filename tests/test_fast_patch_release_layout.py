"""fastground.patch on models it did not build: the release's attribute layout with other
classes (a BERT Q-Former assembled from transformers' BERT modules, the release's
`LEGOLlamaModel` / `BertLMHeadModel` names). Everything recognisable is swapped and computes
the same function forward and backward; what cannot be swapped is named in a warning, or
refused by strict=True without touching the model; unpatch restores every class.

The release's code is not vendored: these module trees are built here with its attribute
names and shapes (../shared/GROUNDINGGPT-REFERENCE.md, "The Q-Former layer")."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from transformers import BertConfig
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions
from transformers.models.bert import modeling_bert as mb

import fastground
from fastground.fast.patching import PatchError, plan
from fastground.kernels.runtime import trace_launches
from fastground.model.qformer import extended_key_mask
from tolerances import REL_TOL, REL_TOL_GRAD, rel_err

HIDDEN, HEADS, INTER, ENC, LQ = 24, 2, 40, 20, 5


def bert_config(act="gelu"):
    cfg = BertConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=INTER, hidden_act=act,
                     attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, layer_norm_eps=1e-12)
    cfg._attn_implementation = "eager"
    return cfg


class Embeddings(nn.Module):
    """Queries only, as the release strips word/position embeddings."""

    def __init__(self, cfg):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(512).expand(1, -1).clone())


class Layer(nn.Module):
    def __init__(self, cfg, cross: bool, encoder_width: int):
        super().__init__()
        self.attention = mb.BertAttention(cfg)
        if cross:
            self.crossattention = mb.BertAttention(cfg, is_cross_attention=True)
            # the release sizes cross-attention keys/values by the encoder width
            self.crossattention.self.key = nn.Linear(encoder_width, cfg.hidden_size)
            self.crossattention.self.value = nn.Linear(encoder_width, cfg.hidden_size)
        self.intermediate_query = mb.BertIntermediate(cfg)
        self.output_query = mb.BertOutput(cfg)


class Encoder(nn.Module):
    def __init__(self, cfg, layers, freq, encoder_width):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg, i % freq == 0, encoder_width) for i in range(layers))


class BertModel(nn.Module):
    """The release's Q-Former body layout, its forward on transformers' BERT modules."""

    def __init__(self, cfg, layers=2, freq=1, encoder_width=ENC):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg, layers, freq, encoder_width)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, head_mask=None, query_embeds=None,
                encoder_hidden_states=None, encoder_attention_mask=None, past_key_values=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, is_decoder=False):
        assert input_ids is None, "text path not modelled"
        h = self.embeddings.dropout(self.embeddings.LayerNorm(query_embeds))
        self_bias = extended_key_mask(attention_mask, h.dtype)
        enc_bias = extended_key_mask(encoder_attention_mask, h.dtype)
        for layer in self.encoder.layer:
            h = layer.attention(h, attention_mask=self_bias)[0]
            if getattr(layer, "crossattention", None) is not None:
                h = layer.crossattention(h, encoder_hidden_states=encoder_hidden_states,
                                         encoder_attention_mask=enc_bias)[0]
            h = layer.output_query(layer.intermediate_query(h), h)
        if return_dict is False:
            return (h, None)
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=h)


class BertLMHeadModel(nn.Module):
    def __init__(self, cfg, **kw):
        super().__init__()
        self.bert = BertModel(cfg, **kw)
        self.cls = None


class LEGOLlamaModel(nn.Module):
    """The release model's branch modules under their release names (no LLM: not needed)."""

    def __init__(self, act="gelu", wrapped_proj=False):
        super().__init__()
        cfg = bert_config(act)
        self.Qformer = BertLMHeadModel(cfg, layers=4, freq=2, encoder_width=28)  # frame Q-Former: cross every 2nd
        self.video_Qformer = BertLMHeadModel(cfg, layers=2, freq=1, encoder_width=HIDDEN)
        self.audio_Qformer = BertLMHeadModel(cfg, layers=2, freq=1, encoder_width=ENC)
        self.llama_proj = nn.Linear(HIDDEN, 36)
        self.audio_llama_proj = LoRALinear(HIDDEN, 36) if wrapped_proj else nn.Linear(HIDDEN, 36)
        self.mm_vision_projector = nn.Sequential(nn.Linear(16, 36), nn.GELU(), nn.Linear(36, 36))
        with torch.no_grad():
            for n, p in self.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.1)


class LoRALinear(nn.Linear):
    """A wrapped projection patch must not silently replace (its forward adds a low-rank term)."""

    def __init__(self, i, o):
        super().__init__(i, o)
        self.lora = nn.Parameter(torch.zeros(o, i))

    def forward(self, x):
        return super().forward(x) + x @ self.lora.T


def _qformer_call(qformer, queries, states, mask):
    return qformer.bert(query_embeds=queries, encoder_hidden_states=states, encoder_attention_mask=mask,
                        return_dict=True).last_hidden_state


def _fwd_bwd(model, name, queries, states, mask):
    model.zero_grad(set_to_none=True)
    q = queries.clone().requires_grad_()
    s = states.clone().requires_grad_()
    out = _qformer_call(getattr(model, name), q, s, mask)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(9)))
    grads = {n: p.grad for n, p in getattr(model, name).named_parameters() if p.grad is not None}
    return out.detach(), q.grad, s.grad, grads


@pytest.mark.parametrize("name,width,lk", [("video_Qformer", HIDDEN, 14), ("audio_Qformer", ENC, 3),
                                           ("Qformer", 28, 9)])
def test_release_layout_qformers_are_swapped_and_compute_the_same(name, width, lk):
    torch.manual_seed(0)
    ref = LEGOLlamaModel().eval()
    fast = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything here can be swapped: no warning
        fastground.patch(fast, llama=False, strict=True)
    bert = getattr(fast, name).bert
    assert type(bert).__name__ == "FastBertModel" and isinstance(bert, BertModel)
    queries = torch.randn(2, LQ, HIDDEN)
    states = torch.randn(2, lk, width)
    mask = torch.ones(2, lk, dtype=torch.long)
    mask[1, lk // 2:] = 0
    out_r, dq_r, ds_r, g_r = _fwd_bwd(ref, name, queries, states, mask)
    with trace_launches() as log:
        out_f, dq_f, ds_f, g_f = _fwd_bwd(fast, name, queries, states, mask)
    assert {"_kv_fwd_kernel", "_attn_fwd_kernel", "_attn_bwd_kernel", "_kv_bwd_dw_kernel"} <= {r.name for r in log}
    assert rel_err(out_f, out_r) <= REL_TOL[torch.float32]
    assert rel_err(dq_f, dq_r) <= REL_TOL_GRAD[torch.float32]
    assert rel_err(ds_f, ds_r) <= REL_TOL_GRAD[torch.float32]
    assert set(g_f) == set(g_r) and len(g_r) >= 16
    biggest = max(g.norm() for g in g_r.values())
    for n in g_r:
        if g_r[n].norm() <= 1e-6 * biggest:  # key biases: zero up to rounding (softmax shift)
            assert g_f[n].norm() <= 1e-5 * biggest, n
        else:
            assert rel_err(g_f[n], g_r[n]) <= REL_TOL_GRAD[torch.float32], n
    # tuple outputs as the release's return_dict=False gives them
    with torch.no_grad():
        tup = bert(query_embeds=queries, encoder_hidden_states=states, return_dict=False)
    assert rel_err(tup[0], _qformer_call(getattr(ref, name), queries, states, None).detach()) <= REL_TOL[torch.float32]


def test_release_layout_adapters_swapped_and_unpatch_restores_every_class():
    torch.manual_seed(1)
    model = LEGOLlamaModel()
    classes = {n: type(m) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    fastground.patch(model, llama=False, strict=True)
    assert type(model.llama_proj).__name__ == "FastLinear"
    assert type(model.mm_vision_projector).__name__ == "FastMLPAdapter"
    assert all(type(getattr(model, q).bert).__name__ == "FastBertModel" for q in ("Qformer", "video_Qformer", "audio_Qformer"))
    assert dict(model.named_parameters()) == params  # same objects
    x = torch.randn(3, 16)
    assert rel_err(model.mm_vision_projector(x), nn.Sequential.forward(model.mm_vision_projector, x)) <= REL_TOL[torch.float32]
    fastground.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not plan(model)[1]


def test_what_cannot_be_swapped_is_named_and_strict_refuses():
    torch.manual_seed(2)
    model = LEGOLlamaModel(act="gelu_new", wrapped_proj=True)  # tanh GELU in the Q-Formers; a LoRA projection
    classes = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(PatchError) as err:
        fastground.patch(model, llama=False, strict=True)
    msg = str(err.value)
    for name in ("Qformer.bert", "video_Qformer.bert", "audio_Qformer.bert", "audio_llama_proj"):
        assert f"  {name}:" in msg, msg
    assert "exact (erf) GELU" in msg and "LoRALinear" in msg
    assert {n: type(m) for n, m in model.named_modules()} == classes  # strict changed nothing
    assert not fastground.fast.patching.is_patched(model)
    with pytest.warns(RuntimeWarning, match="audio_llama_proj: is a LoRALinear"):
        fastground.patch(model, llama=False)
    # the rest is swapped; the refused modules keep their class and their own forward
    assert type(model.llama_proj).__name__ == "FastLinear"
    assert type(model.audio_llama_proj) is LoRALinear
    assert type(model.video_Qformer.bert) is BertModel


def test_fastground_qformers_are_recognised_by_structure_too():
    """The patch decision for our own model comes from the same structural check."""
    from fastground.model.qformer import QFormer, QFormerSpec
    holder = nn.Module()
    holder.some_qformer = QFormer(QFormerSpec(hidden_size=24, num_layers=2, num_heads=2, intermediate_size=40,
                                              encoder_width=20))
    swaps, refused = plan(holder)
    assert [n for n, _, _ in swaps] == ["some_qformer.bert"] and not refused
