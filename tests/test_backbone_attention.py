"""The varlen backbone path (torch's bundled FlashAttention-2 on GPU) around its kernel:
unpadding, packing and GQA, checked on CPU with the per-sequence reference standing in
for the CUDA kernel."""
import torch

from fastground import GroundingGPT, GroundingGPTConfig
from fastground.model import varlen
from fastground.testing import with_token_ids


def _model(impl):
    cfg = with_token_ids(GroundingGPTConfig.from_preset("tiny", attn_implementation=impl, num_key_value_heads=2))
    torch.manual_seed(0)
    return GroundingGPT(cfg).eval()


def test_varlen_matches_sdpa_padded_and_packed():
    ref, fast = _model("sdpa"), _model(varlen.NAME)
    fast.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 400, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    with torch.no_grad():
        a = ref(ids, attention_mask=mask).logits
        b = fast(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(b[keep], a[keep], rtol=1e-5, atol=1e-5)
    # packed: three samples in one row, cu_seqlens handed to the kernel
    lens = [5, 9, 3]
    packed = torch.randint(3, 400, (1, sum(lens)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    with torch.no_grad():
        p = fast(packed, position_ids=pos, cu_seqlens=cu, max_seqlen=9).logits
        for s, n in zip(cu[:-1].tolist(), lens):
            one = ref(packed[:, s:s + n]).logits
            torch.testing.assert_close(p[:, s:s + n], one, rtol=1e-5, atol=1e-5)


def test_backend_choice_on_cpu_is_sdpa():
    from fastground.model.backbone import pick_attention_backend
    assert pick_attention_backend("auto") == "sdpa"
    assert pick_attention_backend("eager") == "eager"
