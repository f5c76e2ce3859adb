"""Packed and padded batches of the same samples give the same loss and gradients on the
tiny model: position_ids restart per sample, attention stays inside each sample, and no
token predicts across a boundary."""
import torch

from fastground import GroundingGPT, GroundingGPTConfig
from fastground.data.collate import collate_packed, collate_padded
from fastground.testing import media_block, media_tensor, with_token_ids


def samples(cfg):
    g = torch.Generator().manual_seed(3)

    def words(n):
        return torch.randint(3, cfg.vocab_size - 9, (n,), generator=g).tolist()

    out = []
    for i, (modality, n_text) in enumerate([("image", 5), (None, 9), ("video", 4), ("sound", 7), (None, 3)]):
        ids = [cfg.bos_token_id] + words(2) + (media_block(cfg, modality) if modality else []) + words(n_text)
        ids = torch.tensor(ids)
        labels = ids.clone()
        labels[: len(ids) - n_text] = -100  # answers only, as preprocess_v1 masks the prompt
        s = {"id": str(i), "input_ids": ids, "labels": labels, "image": None, "video": None, "sound": None}
        if modality:
            s[modality] = media_tensor(cfg, modality, 1, g)[0]
        out.append(s)
    return out


def test_packed_equals_padded_loss_and_grads():
    cfg = with_token_ids(GroundingGPTConfig.from_preset("tiny"))
    torch.manual_seed(0)
    model = GroundingGPT(cfg).eval()  # eval: no dropout, so both runs see the same function
    ss = samples(cfg)
    padded = collate_padded(ss, cfg.pad_token_id)
    packed = collate_packed(ss)
    assert packed["input_ids"].shape[0] == 1 and packed["cu_seqlens"].numel() == len(ss) + 1
    # samples whose first label would otherwise be real still never learn across a boundary
    assert (packed["labels"][0, packed["cu_seqlens"][:-1].long()] == -100).all()

    loss_pad = model(**padded).loss
    g_pad = torch.autograd.grad(loss_pad, [p for p in model.parameters() if p.requires_grad])
    loss_packed = model(**packed).loss
    g_packed = torch.autograd.grad(loss_packed, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(loss_packed, loss_pad, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_packed, g_pad):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
