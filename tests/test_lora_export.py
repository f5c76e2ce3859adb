"""LoRA export: the trainer's final export folds every adapter into its base weight,
W' = W + (alpha / r) B A, with the scaling worked out here from the settings, and the
exported plain model computes what the LoRA model computed on the same batch."""
import os
import re

import pytest
import torch

from fastground import GroundingGPT, GroundingGPTConfig
from fastground.testing import mixed_batch, with_token_ids

pytestmark = pytest.mark.requires("peft")

R, ALPHA = 4, 16  # scaling 4: a merge that forgets it is off by 4x


class _Tokenizer:
    def save_pretrained(self, path):
        open(os.path.join(path, "tokenizer_config.json"), "w").write("{}")


def test_exported_weights_are_base_plus_scaled_lora_and_compute_the_same(tmp_path):
    from fastground.train.checkpoint import export_final
    from fastground.train.config import TrainConfig
    from fastground.train.engine import add_lora

    cfg = with_token_ids(GroundingGPTConfig.from_preset("tiny", qformer_hidden_dropout=0.0,
                                                        qformer_attention_dropout=0.0))
    torch.manual_seed(0)
    model = GroundingGPT(cfg)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, TrainConfig(lora=True, lora_r=R, lora_alpha=ALPHA, lora_dropout=0.0))
    # as after training: B is no longer its initial zeros
    g = torch.Generator().manual_seed(1)
    lora = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            m = re.fullmatch(r"(.*)\.lora_([AB])\.default\.weight", name)
            if m:
                if m.group(2) == "B":
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
                lora.setdefault(m.group(1) + ".weight", {})[m.group(2)] = p
    targets = [k for k in base if re.fullmatch(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight", k)]
    assert sorted(lora) == sorted(targets) and len(targets) == 7 * cfg.num_hidden_layers
    expected = {k: (base[k].double() + (ALPHA / R) * lora[k]["B"].double() @ lora[k]["A"].double()).float()
                for k in targets}

    batch = mixed_batch(cfg)
    model.eval()
    with torch.no_grad():
        want = model(**batch).logits
        # the adapters change the function (so equal outputs below mean they were merged)
        assert (want - GroundingGPT(cfg).eval()(**batch).logits).abs().max() > 1e-3

    final = export_final(model, _Tokenizer(), str(tmp_path / "run"), {"lora": True})
    exported = GroundingGPT.from_pretrained(final).eval()
    sd = exported.state_dict()
    assert not any("lora" in k for k in sd)
    assert set(sd) == set(base)
    for k, v in sd.items():
        if k in expected:
            torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
            assert (v - base[k]).abs().max() > 1e-4, k  # really moved
        else:
            assert torch.equal(v, base[k]), k
    with torch.no_grad():
        got = exported(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
