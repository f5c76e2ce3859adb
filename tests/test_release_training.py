"""Training as the release trains: stage-1 input embeddings, the two loss reductions, and
the lego template end to end (a tiny model trained with it stops at `###`)."""
from __future__ import annotations

import math
import types

import pytest
import torch

from fastground import GroundingGPT, GroundingGPTConfig
from fastground.data.templates import LEGO, VICUNA_V1, get_template, template_for, training_template
from fastground.model.stages import set_stage
from fastground.testing import media_block, media_tensor, with_token_ids
from fastground.train.loss_reduction import micro_batch_weight, step_loss

IGNORE = -100


@pytest.fixture(autouse=True)
def _one_thread():
    # 64-wide models: extra threads only contend (10x slower on 2 busy cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(seed=0):
    # No dropout: train mode is deterministic, so gradients compare exactly.
    cfg = with_token_ids(GroundingGPTConfig.from_preset("tiny", qformer_hidden_dropout=0.0,
                                                        qformer_attention_dropout=0.0))
    torch.manual_seed(seed)
    return GroundingGPT(cfg)


# ---------------------------------------------------------------------------- stage 1 embeddings
def _media_sample(cfg, modality, words):
    ids = torch.tensor([1] + words[:3] + media_block(cfg, modality) + words[3:])
    labels = ids.clone()
    labels[:-len(words[3:])] = IGNORE
    return ids, labels


def _marker_rows(cfg, modalities=("image", "video", "sound")):
    return sorted(i for m in modalities for i in cfg.token_ids(m)[1:])


def _changed_rows(model, before):
    return (model.model.embed_tokens.weight.detach() != before).any(1).nonzero().flatten().tolist()


def _one_step(model, batch):
    trainable = set_stage(model, 1)
    model.train()
    before = model.model.embed_tokens.weight.detach().clone()
    opt = torch.optim.AdamW(list(trainable.values()), lr=1e-2, weight_decay=0.0)
    model(**batch).loss.backward()
    opt.step()
    return trainable, before


def test_stage1_trains_exactly_the_six_media_start_end_rows():
    model = tiny()
    cfg = model.config
    samples = [_media_sample(cfg, m, list(range(10 + 7 * k, 17 + 7 * k)))
               for k, m in enumerate(("image", "video", "sound"))]
    length = max(len(i) for i, _ in samples)
    ids = torch.zeros(3, length, dtype=torch.long)
    labels = torch.full((3, length), IGNORE)
    mask = torch.zeros(3, length, dtype=torch.long)
    for b, (i, l) in enumerate(samples):
        ids[b, :len(i)], labels[b, :len(l)], mask[b, :len(i)] = i, l, 1
    batch = dict(input_ids=ids, labels=labels, attention_mask=mask, images=media_tensor(cfg, "image", 1),
                 videos=media_tensor(cfg, "video", 1), sounds=media_tensor(cfg, "sound", 1))
    trainable, before = _one_step(model, batch)
    assert "model.embed_tokens.weight" in trainable and "lm_head.weight" not in trainable
    assert not any(n.startswith("model.layers.") for n in trainable)
    assert model.stage1_embeddings
    assert _changed_rows(model, before) == _marker_rows(cfg)  # those six, nothing else
    grad = model.model.embed_tokens.weight.grad
    assert (grad[_marker_rows(cfg)].abs().sum(1) > 0).all()
    # the branches still train through their spliced features
    for name in ("model.mm_vision_projector.0.weight", "model.llama_proj.weight", "model.audio_llama_proj.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert set_stage(model, 2) and not model.stage1_embeddings


def test_stage1_packed_text_only_sample_trains_its_rows():
    # A packed row: an image sample (its text rows frozen) and a text-only sample (every row
    # it feeds into the loss trains, as in the release).
    model = tiny(1)
    cfg = model.config
    img_ids, img_labels = _media_sample(cfg, "image", list(range(10, 17)))
    txt = torch.tensor([1, 40, 41, 42, 43, 44, 45])
    txt_labels = txt.clone()
    txt_labels[:3] = IGNORE
    n1, n2 = len(img_ids), len(txt)
    batch = dict(input_ids=torch.cat([img_ids, txt])[None], labels=torch.cat([img_labels, txt_labels])[None],
                 position_ids=torch.cat([torch.arange(n1), torch.arange(n2)])[None],
                 cu_seqlens=torch.tensor([0, n1, n1 + n2], dtype=torch.int32), max_seqlen=max(n1, n2),
                 images=media_tensor(cfg, "image", 1))
    _, before = _one_step(model, batch)
    changed = set(_changed_rows(model, before))
    assert set(_marker_rows(cfg, ("image",))) <= changed
    assert {40, 41, 42, 43, 44} <= changed  # the text-only sample's rows (its last token feeds no loss)
    assert not changed & set(range(10, 17))  # the image sample's text rows: detached
    assert changed <= set(_marker_rows(cfg, ("image",))) | {1, 40, 41, 42, 43, 44}


# ---------------------------------------------------------------------------- loss reductions
def test_loss_reductions_hand_computed():
    # Two ranks, two micro-batches each, per-token losses:
    #   rank 0: A = [1, 2, 3] (sum 6, mean 2), B = [4] (mean 4)
    #   rank 1: C = [2, 2] (mean 2), D = [1] * 6 (mean 1)
    # token mean: (6 + 4 + 4 + 6) / 12 = 5/3; release: mean of means (2 + 4 + 2 + 1) / 4 = 9/4.
    ranks = [[[1.0, 2.0, 3.0], [4.0]], [[2.0, 2.0], [1.0] * 6]]
    total = sum(len(m) for r in ranks for m in r)
    for reduction, want in (("token", 5 / 3), ("release", 9 / 4)):
        weighted = sum(micro_batch_weight(reduction, len(m), total, 2, 2) * sum(m) for r in ranks for m in r)
        assert math.isclose(step_loss(weighted, 2), want, rel_tol=1e-12), reduction
    # a micro-batch without supervised tokens adds nothing under release, but still counts
    assert micro_batch_weight("release", 0, 5, 1, 2) == 0.0
    with pytest.raises(ValueError, match="unknown loss reduction"):
        micro_batch_weight("mean", 1, 1, 1, 1)


class _Engine:
    """One rank's DeepSpeed engine stand-in: backpropagates what the trainer hands it."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **batch):
        return self.module(**batch)

    def backward(self, loss, scale_wrt_gas=True, **_):
        assert scale_wrt_gas is False
        loss.backward()

    def step(self):
        pass

    def set_gradient_accumulation_boundary(self, last):
        pass

    def get_lr(self):
        return [0.0]

    def get_global_grad_norm(self):
        return None


def _text_sample(words, answer):
    ids = torch.tensor([1] + words + answer)
    labels = ids.clone()
    labels[:1 + len(words)] = IGNORE
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("reduction", ["token", "release"])
def test_trainer_step_loss_reductions(reduction):
    """Micro-batches of 1 and 2 samples with 2 and 9 answer tokens: the step's loss and
    gradient against per-token cross-entropies summed here by hand."""
    from fastground.train.config import TrainConfig
    from fastground.train.data import collate
    from fastground.train.engine import DistInfo, train_step

    model = tiny(2)
    set_stage(model, 3)
    model.train()
    groups = [[_text_sample([5, 6, 7], [8, 9, 10])],
              [_text_sample([11, 12], [13, 14, 15, 16, 17]), _text_sample([18], [19, 20, 21, 22, 23, 24])]]
    params = [p for p in model.parameters() if p.requires_grad]

    sums, counts = [], []
    for g in groups:
        s, n = 0.0, 0
        for x in g:
            logits = model(x["input_ids"][None]).logits[0].double()
            target = x["labels"][1:]
            keep = target != IGNORE
            lp = logits[:-1][keep].log_softmax(-1).gather(1, target[keep][:, None])
            s, n = s - lp.sum(), n + int(keep.sum())
        sums.append(s)
        counts.append(n)
    assert counts == [3, 11]  # next-token positions: 3 and 5 + 6
    if reduction == "token":
        want = sum(sums) / sum(counts)
    else:
        want = (sums[0] / counts[0] + sums[1] / counts[1]) / 2
    want.backward()
    want = float(want.detach())
    want_grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    model.zero_grad(set_to_none=True)

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), own_group=False)
    run = types.SimpleNamespace(engine=_Engine(model), info=info,
                                cfg=TrainConfig(packed=False, loss_reduction=reduction), bf16=False,
                                td=types.SimpleNamespace(pad_token_id=0))
    micro = [collate([dict(x) for x in g], 0, False, 4096) for g in groups]
    stats = train_step(run, micro)
    assert math.isclose(stats.loss, want, rel_tol=1e-5), (stats.loss, want)
    got = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    num = sum((a.double() - b.double()).pow(2).sum() for a, b in zip(got, want_grads))
    den = sum(b.double().pow(2).sum() for b in want_grads)
    assert math.sqrt(num / den) < 1e-5
    other = (sums[0] / counts[0] + sums[1] / counts[1]) / 2 if reduction == "token" else sum(sums) / sum(counts)
    assert abs(float(other.detach()) - want) > 1e-3  # the two reductions differ on this step


def test_release_reduction_refuses_packing():
    from fastground.train.loss_reduction import check_packing

    assert check_packing("release", None) is False and check_packing("token", None) is None
    with pytest.raises(ValueError, match="--no-packed"):
        check_packing("release", True)


# ---------------------------------------------------------------------------- templates
def test_template_resolution():
    cfg = GroundingGPTConfig.from_preset("tiny")
    assert cfg.conversation_template is None and template_for(cfg) is LEGO  # a release checkpoint
    assert template_for(cfg.replace(conversation_template="vicuna_v1")) is VICUNA_V1
    assert training_template(None, None)[0] is LEGO
    assert training_template(None, "vicuna_v1")[0] is VICUNA_V1
    t, why = training_template("lego", "vicuna_v1")
    assert t is LEGO and "vicuna_v1" in why
    with pytest.raises(ValueError, match="lego, vicuna_v1"):
        get_template("llama2")


def test_release_inference_prompt_and_stop_rule():
    # A release config.json: no "fastground" section, so no template recorded -> lego.
    release = GroundingGPTConfig.from_preset("tiny").to_release_dict()
    del release["fastground"]
    t = template_for(GroundingGPTConfig.from_release_dict(release))
    # What the release's CLI builds: no space after "###", the media block first then "\n".
    assert t.inference_prompt("<image>\nWhere is the cat?") == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions.###Human: <image>\nWhere is the "
        "cat?###Assistant:")
    assert t.stop_strings == ("###",)
    assert t.cut_answer(" [0.1,0.2,0.3,0.4]\n### Human: and now?") == "[0.1,0.2,0.3,0.4]"
    assert t.cut_answer(" no stop yet") == "no stop yet"
    assert VICUNA_V1.inference_prompt("hi").endswith(" USER: hi ASSISTANT:")


# ---------------------------------------------------------------------------- lego end to end
@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory):
    from fastground.data.demo import ensure_demo_data
    from fastground.data.tokenizer import load_tokenizer

    # Shared with tests/test_demo.py and tests/test_media.py: generated once per session.
    root = ensure_demo_data(tmp_path_factory.getbasetemp() / "fastground-demo")
    return load_tokenizer(str(root / "tokenizer"))


QA = [("What colour do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
      ("How many corners does a square have?", "A square has four corners.")]


def _train_tiny(tok, template: str, steps: int = 120):
    """A tiny text-only model fitted to QA with `template`'s preprocessing (plain AdamW)."""
    from fastground.data.collate import collate_padded
    from fastground.data.conversation import preprocess

    cfg = GroundingGPTConfig.from_preset("tiny", conversation_template=template)
    cfg.set_token_ids(tok)
    torch.manual_seed(0)
    model = GroundingGPT(cfg)
    set_stage(model, 3)
    items = []
    for q, a in QA:
        ids, labels = preprocess([{"from": "human", "value": q}, {"from": "gpt", "value": a}], tok, cfg, 256)
        items.append({"input_ids": ids, "labels": labels})
    batch = collate_padded(items, tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()
    return model.eval()


def test_tiny_model_trained_with_lego_stops_at_separator(demo_tokenizer):
    from fastground.prompting import prompt_ids, prompt_style

    tok = demo_tokenizer
    model = _train_tiny(tok, "lego")
    style = prompt_style(model.config)
    assert style is LEGO
    for q, a in QA:
        ids = prompt_ids(style, [(q, None)], tok, model.config)
        assert style.render([(q, None)]).endswith(f"###Human: {q}###Assistant:")  # the release's prompt
        assert tok.convert_ids_to_tokens(ids[-2:].tolist()) == ["▁###", "▁Assistant:"]
        out = model.generate([ids], tokenizer=tok, max_new_tokens=40, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, stop_strings=style.stop_strings)
        raw = tok.decode(out.tokens[0], skip_special_tokens=True)
        assert out.finish_reasons == ["stop"] and raw.rstrip().endswith("###"), raw
        text = out.texts[0]
        assert text and "#" not in text and style.cut_answer(raw) == text, raw
        # Trained on "\n### Assistant: ", prompted "###Assistant:" (the release's mismatch; the
        # demo tokenizer makes both end in the same two tokens), it gives the trained answer.
        assert text == a, (text, a)
        # lego never trains an EOS: stopping only at EOS, it runs on into invented turns
        longer = model.generate([ids], tokenizer=tok, max_new_tokens=20, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)
        assert longer.finish_reasons == ["length"] and "###" in longer.texts[0], longer.texts


@pytest.mark.slow
@pytest.mark.requires("deepspeed")
def test_checkpoints_answer_in_their_own_template(demo_tokenizer, tmp_path_factory, tmp_path, capsys):
    """Acceptance: a checkpoint trained with the default template and one trained with
    vicuna_v1 each answer through `python -m fastground.infer` in their own template, with no
    flag: the template recorded in config.json decides the prompt and the stop rule."""
    import json as _json

    from fastground.infer import main as infer_main
    from fastground.train.cli import parse_config
    from fastground.train.engine import train

    demo = str(tmp_path_factory.getbasetemp() / "fastground-demo")
    data = tmp_path / "qa.json"
    data.write_text(_json.dumps([{"id": f"qa{i}-{k}", "conversations": [
        {"from": "human", "value": q}, {"from": "gpt", "value": a}]} for i in range(4) for k, (q, a) in enumerate(QA)]))
    for template, flag in (("lego", []), ("vicuna_v1", ["--template", "vicuna_v1"])):
        out = tmp_path / template
        train(parse_config(["--stage", "3", "--data", str(data), "--demo-data", demo, "--output", str(out),
                            "--max-steps", "60", "--global-batch", "2", "--micro-batch", "2", "--lr", "3e-3",
                            "--warmup-ratio", "0", "--save-every", "0", "--no-progress", "--no-tensorboard",
                            "--no-fast-path", "--no-packed", *flag], world_size=1))
        final = out / "final"
        assert GroundingGPTConfig.load(str(final)).conversation_template == template
        capsys.readouterr()
        assert infer_main(["--model", str(final), "--question", QA[0][0], "--max-new-tokens", "30",
                           "--device", "cpu", "--dtype", "float32"]) == 0
        answer = capsys.readouterr().out.strip()
        if template == "vicuna_v1":
            # trained and prompted alike (" USER: ... ASSISTANT:"), stopped at the EOS it learned
            assert answer == QA[0][1], answer
        else:
            # prompted "###Human: ...###Assistant:" and cut at the "###" it learned
            assert answer == QA[0][1], answer
