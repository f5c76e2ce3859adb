"""The fast path against the reference: whole video/audio branches (forward and backward,
inputs and every weight), patch/unpatch, and a patched tiny model end to end.

Runs the Triton kernels under TRITON_INTERPRET=1 on CPU (tests/conftest.py)."""
import copy
from collections import deque

import pytest
import torch
from torch import nn

import fastground
import fastground.fast.qformer as fq
from fastground import GroundingGPT, GroundingGPTConfig
from fastground.kernels.cross_attention import attention_dropout_mask
from fastground.kernels.fused_linear import dropout_mask
from fastground.testing import mixed_batch, with_token_ids
from tolerances import REL_TOL, REL_TOL_GRAD, rel_err


def branch_config(frames, video_queries, frame_queries, width, dropout=0.0):
    """Tiny model config with the branch shapes under test (hidden sizes not multiples of blocks)."""
    return with_token_ids(GroundingGPTConfig.from_preset(
        "tiny", num_frames=frames, max_frame=max(frames, 2) + 1, video_token_len=video_queries,
        num_query_token=frame_queries, qformer_hidden_size=width, qformer_num_heads=width // 12 if width % 12 == 0 else 2,
        qformer_intermediate_size=2 * width + 6, hidden_size=36, num_attention_heads=3, num_key_value_heads=3,
        audio_out_dim=20, sound_token_len=video_queries, qformer_hidden_dropout=dropout,
        qformer_attention_dropout=dropout))


def models(cfg, dtype):
    torch.manual_seed(0)
    ref = GroundingGPT(cfg).model
    # make biases and LayerNorm affine non-trivial so their gradients are checked meaningfully
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("bias") or "LayerNorm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    ref = ref.to(dtype)
    fast = copy.deepcopy(ref)
    fastground.patch(fast)
    return ref, fast


def trainable_of(inner, branch):
    names = {"video": ("video_Qformer.", "video_query_tokens", "video_frame_position_embedding.", "llama_proj."),
             "audio": ("audio_Qformer.", "audio_query_tokens", "audio_position_embedding.", "audio_llama_proj.")}[branch]
    return {n: p for n, p in inner.named_parameters() if n.startswith(names)}


def run_branch(inner, branch, feats, mask):
    fn = inner.video_branch if branch == "video" else inner.audio_branch
    out = fn(feats, mask)
    return out


def _grads(inner, branch, feats, mask, g):
    x = feats.clone().requires_grad_()
    out = run_branch(inner, branch, x, mask)
    out.backward(g.to(out.dtype))
    grads = {"d_input": x.grad}
    grads.update({n: p.grad for n, p in trainable_of(inner, branch).items() if p.grad is not None})
    return out.detach(), grads


def compare(ref, fast, branch, feats, mask, dtype):
    """Fast vs reference in `dtype`. In bf16 both are also compared with a float64 reference:
    a gradient that is a sum with heavy cancellation (a bias over few rows) has no bf16 bound
    tighter than what torch's own bf16 path achieves, so the fast path passes when it is within
    the table's tolerance of the reference or no worse than 1.5x torch's own bf16 error."""
    queries, proj = ((ref.video_query_tokens, ref.llama_proj) if branch == "video"
                     else (ref.audio_query_tokens, ref.audio_llama_proj))
    g = torch.randn(feats.shape[0], queries.shape[1], proj.out_features, device=feats.device)
    out_ref, g_ref = _grads(ref, branch, feats, mask, g)
    out_fast, g_fast = _grads(fast, branch, feats, mask, g)
    assert set(g_ref) == set(g_fast)
    exact = None
    if dtype != torch.float32:
        ref64 = copy.deepcopy(ref).double()
        exact = _grads(ref64, branch, feats.double(), mask, g.double())
    errs = {}

    def check(name, fast_t, ref_t, tol, exact_t):
        err = rel_err(fast_t, ref_t)
        if err > tol and exact_t is not None:
            err_fast, err_torch = rel_err(fast_t, exact_t), rel_err(ref_t, exact_t)
            if err_fast <= max(tol, 1.5 * err_torch):
                return
        errs[name] = err if err > tol else None

    check("out", out_fast, out_ref, REL_TOL[dtype], exact and exact[0])
    biggest = max(t.double().norm() for t in g_ref.values())
    for n in g_ref:
        if g_ref[n].double().norm() <= 1e-6 * biggest:
            # Zero in exact arithmetic (a key bias, which softmax ignores; Q/K of a one-key
            # attention): both sides must be rounding noise next to the real gradients.
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            assert g_fast[n].double().norm() <= tol * biggest, n
            continue
        check(n, g_fast[n], g_ref[n], REL_TOL_GRAD[dtype], exact and exact[1][n])
    bad = {k: v for k, v in errs.items() if v is not None}
    assert not bad, bad


VIDEO_CASES = [  # frames, video queries, frame queries, width
    (1, 8, 4, 24),
    (7, 1, 3, 36),
    (7, 8, 5, 24),
    (64, 64, 2, 24),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("frames,vq,fq_,width", VIDEO_CASES)
def test_video_branch_matches_reference(frames, vq, fq_, width, dtype):
    cfg = branch_config(frames, vq, fq_, width)
    ref, fast = models(cfg, dtype)
    ref.eval(), fast.eval()
    g = torch.Generator().manual_seed(frames * 100 + vq)
    feats = torch.randn(2, frames, fq_, width, generator=g).to(dtype)
    compare(ref, fast, "video", feats, None, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_video_branch_with_frame_mask(dtype):
    cfg = branch_config(7, 8, 3, 24)
    ref, fast = models(cfg, dtype)
    ref.eval(), fast.eval()
    feats = torch.randn(3, 7, 3, 24).to(dtype)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0  # a short video padded to 7 frames
    mask[2, 1:] = 0
    compare(ref, fast, "video", feats, mask, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clips,queries", [(3, 8), (1, 1), (3, 5)])
def test_audio_branch_matches_reference(clips, queries, dtype):
    cfg = branch_config(4, queries, 4, 24)
    ref, fast = models(cfg, dtype)
    ref.eval(), fast.eval()
    feats = torch.randn(2, clips, cfg.audio_out_dim).to(dtype)
    mask = None if clips == 1 else torch.tensor([[1] * clips, [1] * (clips - 1) + [0]])
    compare(ref, fast, "audio", feats, mask, dtype)


class Recorder:
    """Records every dropout the fast path draws (embedding mask, kernel seeds) in call order,
    then replays them into the reference's nn.Dropout modules, so both use the same masks."""

    def __init__(self):
        self.log = deque()
        self.seed = 1234

    def wrap(self, monkeypatch):
        attention, ln_block, f_dropout = fq.attention, fq.linear_dropout_residual_layernorm, fq.F.dropout

        def attention_rec(q, k, v, key_mask, p, seed, training):
            self.seed += 1
            self.log.append(("attn", self.seed, q.shape[0], q.shape[1], q.shape[2], k.shape[2], p))
            return attention(q, k, v, key_mask, p, self.seed, training)

        def ln_rec(x, w, b, res, lw, lb, eps, p, seed, training):
            self.seed += 1
            self.log.append(("hidden", self.seed, res.shape, p))
            return ln_block(x, w, b, res, lw, lb, eps, p, self.seed, training)

        class F:
            @staticmethod
            def dropout(x, p, training):
                keep = torch.rand(x.shape) >= p
                self.log.append(("embed", keep, p))
                return x * keep / (1 - p) if training and p > 0 else x

            layer_norm = staticmethod(fq.F.layer_norm)

        monkeypatch.setattr(fq, "attention", attention_rec)
        monkeypatch.setattr(fq, "linear_dropout_residual_layernorm", ln_rec)
        monkeypatch.setattr(fq, "F", F)

    def replay_into(self, qformer: nn.Module):
        rec = self

        class Replay(nn.Module):
            def forward(self, x):
                if not self.training:
                    return x
                kind, *data = rec.log.popleft()
                if kind == "embed":
                    keep, p = data
                elif kind == "attn":
                    seed, b, h, lq, lk, p = data
                    keep = attention_dropout_mask(seed, b, h, lq, lk, p)
                else:
                    seed, shape, p = data
                    assert shape.numel() == x.numel()
                    keep = dropout_mask(seed, x.shape[:-1].numel(), x.shape[-1], p).view(x.shape)
                assert keep.shape == x.shape, (kind, keep.shape, x.shape)
                return x * keep / (1 - p)

        for name, m in list(qformer.named_modules()):
            if isinstance(m, nn.Dropout):
                parent = qformer.get_submodule(name.rsplit(".", 1)[0])
                setattr(parent, name.rsplit(".", 1)[1], Replay())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_video_branch_dropout_matches_reference_given_the_same_masks(dtype, monkeypatch):
    cfg = branch_config(7, 8, 3, 24, dropout=0.25)
    ref, fast = models(cfg, dtype)
    ref.train(), fast.train()
    rec = Recorder()
    rec.wrap(monkeypatch)
    feats = torch.randn(2, 7, 3, 24).to(dtype)
    out_fast = fast.video_branch(feats)
    assert len(rec.log) == 1 + 2 * 5  # embeddings + 2 layers x (self, self-out, cross, cross-out, ffn-out)
    rec.replay_into(ref.video_Qformer)
    out_ref = ref.video_branch(feats)
    assert not rec.log
    assert rel_err(out_fast, out_ref) <= REL_TOL[dtype]
    # and dropout really acted: the eval-mode output differs
    ref.eval()
    with torch.no_grad():
        assert rel_err(ref.video_branch(feats), out_ref) > 10 * REL_TOL[dtype]


def test_patch_unpatch_keeps_state_and_parameters():
    cfg = with_token_ids(GroundingGPTConfig.from_preset("tiny"))
    torch.manual_seed(0)
    model = GroundingGPT(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    fastground.patch(model)
    assert type(model.model.video_Qformer).__name__ == "FastQFormer"
    assert type(model.model.llama_proj).__name__ == "FastLinear"
    assert type(model.model.mm_vision_projector).__name__ == "FastMLPAdapter"
    assert {n: p for n, p in model.named_parameters()} == params  # same objects
    assert list(model.state_dict()) == list(before)
    fastground.unpatch(model)
    assert type(model.model.video_Qformer).__name__ == "QFormer"
    assert "video_branch" not in model.model.__dict__
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype, k


def test_patched_tiny_model_matches_reference_outputs_and_gradients():
    cfg = with_token_ids(GroundingGPTConfig.from_preset("tiny"))
    torch.manual_seed(0)
    ref = GroundingGPT(cfg).eval()
    fast = copy.deepcopy(ref)
    fastground.patch(fast)
    batch = mixed_batch(cfg)
    out_ref, out_fast = ref(**batch), fast(**batch)
    out_ref.loss.backward()
    out_fast.loss.backward()
    assert rel_err(out_fast.logits, out_ref.logits) <= REL_TOL[torch.float32]
    pf = dict(fast.named_parameters())
    checked = 0
    biggest = max(p.grad.norm() for p in ref.parameters() if p.grad is not None)
    for n, p in ref.named_parameters():
        if p.grad is None:
            assert pf[n].grad is None, n
        elif p.grad.norm() <= 1e-6 * biggest:  # key biases: zero up to rounding (softmax shift)
            assert pf[n].grad.norm() <= 1e-5 * biggest, n
        else:
            assert rel_err(pf[n].grad, p.grad) <= REL_TOL_GRAD[torch.float32], n
            checked += 1
    assert checked > 50
    # the config can build the fast path directly
    direct = GroundingGPT(cfg.replace(fast_path=True))
    assert type(direct.model.audio_Qformer).__name__ == "FastQFormer"
