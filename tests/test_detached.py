"""Frozen encoders detached from a model trained from a feature cache (fastground.model.detached):
the model holds none of them, and its checkpoints are those of the attached model byte for byte."""
import os

import pytest
import torch

from fastground import GroundingGPT, GroundingGPTConfig
from fastground.model.detached import FOLDER, MANIFEST, WEIGHTS, detach_frozen, frozen_names

pytestmark = pytest.mark.requires("safetensors")


def _model(seed=0):
    torch.manual_seed(seed)
    return GroundingGPT(GroundingGPTConfig.from_preset("tiny"))


def _files(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), root)] = f.read()
    return out


def test_detached_model_holds_no_encoder_and_saves_the_same_checkpoint(tmp_path):
    attached, detached = _model(), _model()
    frozen = sum(p.numel() for p in attached.parameters() if not p.requires_grad)
    attached.save_pretrained(str(tmp_path / "attached"), max_shard_size=200_000)  # several shards
    det = detach_frozen(detached, str(tmp_path / FOLDER), "fp-a", write=True)
    assert all(getattr(detached.model, n) is None for n in frozen_names())
    assert [n for n, p in detached.named_parameters() if not p.requires_grad] == []
    assert det.numel == frozen > 0
    detached.train()  # the frozen-encoder eval switch must skip what is gone
    detached.save_pretrained(str(tmp_path / "detached"), max_shard_size=200_000)
    a, b = _files(tmp_path / "attached"), _files(tmp_path / "detached")
    assert sorted(a) == sorted(b) and sum(k.endswith(".safetensors") for k in a) > 2
    assert [k for k in a if a[k] != b[k]] == []
    back = GroundingGPT.from_pretrained(str(tmp_path / "detached")).state_dict()
    ref = attached.state_dict()
    assert sorted(back) == sorted(ref) and all(torch.equal(back[k], ref[k]) for k in ref)


def test_detached_copy_is_reused_for_the_same_weights_and_rewritten_for_others(tmp_path):
    folder = str(tmp_path / FOLDER)
    detach_frozen(_model(0), folder, "fp-a", write=True)
    weights = os.path.join(folder, WEIGHTS)
    before = os.stat(weights).st_mtime_ns, open(os.path.join(folder, MANIFEST)).read()
    detach_frozen(_model(0), folder, "fp-a", write=True)  # a resume: same fingerprint, kept
    assert (os.stat(weights).st_mtime_ns, open(os.path.join(folder, MANIFEST)).read()) == before
    other = _model(1)
    det = detach_frozen(other, folder, "fp-b", write=True)  # other weights: rewritten
    assert '"fp-b"' in open(os.path.join(folder, MANIFEST)).read()
    ref = _model(1).state_dict()
    sd = det.state_dict()
    assert sd and all(torch.equal(sd[k], ref[k]) for k in sd)


def test_damaged_copy_fails_the_save_naming_the_file(tmp_path):
    model = _model()
    det = detach_frozen(model, str(tmp_path / FOLDER), "fp-a", write=True)
    path = os.path.join(det.directory, WEIGHTS)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match=WEIGHTS):
        model.save_pretrained(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing half written
