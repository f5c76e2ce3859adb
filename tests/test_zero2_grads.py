"""ZeRO-2 on 2 gloo ranks with gradient accumulation, checked where the size of the gradient
shows: plain SGD (an update is lr x the clipped gradient itself, not Adam's ~lr x sign) over
two optimizer steps, with a clipping threshold that binds, against a single-process
reference written here.

The reference shares nothing with the trainer's loss code: its token counts come from the
samples' labels, its loss is the summed next-token NLL of each micro-batch divided by the
step's count over all micro-batches of both ranks, its clipping is the formula written out.
Per step it checks the reduced gradient's norm (as logged, before clipping), the mean loss
and the answer-token count; at the end every trainable weight. A missing world-size factor
or a wrong count changes the norm; per-micro-batch means change the direction; no clipping
changes the step length. One torchrun launch serves all checks."""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastground import GroundingGPT, GroundingGPTConfig
from fastground.data.tokenizer import load_tokenizer

pytestmark = [pytest.mark.requires("deepspeed"), pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORE = -100
WORLD, MICRO, ACCUM, STEPS, STAGE, SEED = 2, 2, 2, 2, 2, 3
LR, CLIP = 4.0, 0.05

# Runs in every rank: the trainer as `python -m fastground.train` runs it, with torch SGD in
# place of AdamW (the only change; the gradient is what is under test).
DRIVER = """
import os, sys, torch
import fastground.train.engine as engine
from fastground.train.cli import parse_config
def sgd(groups, cfg, device):
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.0), "torch SGD (test)"
engine.make_optimizer = sgd
engine.train(parse_config(sys.argv[1:], world_size=int(os.environ["WORLD_SIZE"])))
"""


def _env():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # TRITON_INTERPRET (set by conftest on CPU) would run every kernel of the ranks in the
    # interpreter, 10x slower; the kernels are tested elsewhere, the gradient here.
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET"):
        env.pop(k, None)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fastground.data.demo import ensure_demo_data
    root = tmp_path_factory.mktemp("zero2sgd")
    demo = str(ensure_demo_data(root / "data"))
    tok = load_tokenizer(os.path.join(demo, "tokenizer"))
    # no dropout: the ranks and the reference compute the same function
    cfg = GroundingGPTConfig.from_preset("tiny", qformer_hidden_dropout=0.0, qformer_attention_dropout=0.0)
    cfg.set_token_ids(tok)
    torch.manual_seed(0)
    init = str(root / "init")
    GroundingGPT(cfg).save_pretrained(init)
    tok.save_pretrained(init)
    out = root / "run"
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    ds = root / "ds.json"  # small buckets: several reduce-scatters per backward
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 20000,
                                                    "allgather_bucket_size": 20000}}))
    args = ["--stage", str(STAGE), "--model", init, "--data", os.path.join(demo, f"stage{STAGE}.json"),
            "--image-folder", demo, "--video-folder", demo, "--sound-folder", demo, "--demo-data", demo,
            "--output", str(out), "--max-steps", str(STEPS), "--global-batch", str(WORLD * MICRO * ACCUM),
            "--micro-batch", str(MICRO), "--lr", str(LR), "--weight-decay", "0", "--max-grad-norm", str(CLIP),
            "--seed", str(SEED), "--deepspeed-config", str(ds), "--save-every", "0", "--no-progress",
            "--no-tensorboard", "--no-packed"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(driver), *args]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=str(root))
    assert res.returncode == 0, res.stderr[-4000:]
    assert "ZeRO-2" in res.stderr and f"{WORLD} process(es)" in res.stderr and "torch SGD (test)" in res.stderr
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return dict(demo=demo, init=init, final=str(out / "final"), records=records, stderr=res.stderr)


def _rank_micro_batches(model, tok, demo, rank):
    """The samples of each micro-batch this rank trains on, in order (same data stream,
    same per-sample video crops as the trainer)."""
    from fastground.train.data import build_train_data
    td = build_train_data(os.path.join(demo, f"stage{STAGE}.json"), None, 0.0, tok, model.config,
                          {"image": demo, "video": demo, "sound": demo}, 1024, "pyav", 0.05, SEED,
                          rank, WORLD, MICRO, ACCUM)
    it = iter(td.batches)
    return [[dict(td.samples[i]) for i in next(it)] for _ in range(STEPS * ACCUM)]


def _summed_nll(model, samples, pad_id):
    """Sum over the samples of -log p(label[t+1] | tokens <= t) on supervised positions."""
    from fastground.data.collate import collate_padded
    batch = collate_padded(samples, pad_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   images=batch["images"], videos=batch["videos"], sounds=batch["sounds"]).logits
    total = 0.0
    for b, s in enumerate(samples):
        n = s["input_ids"].numel()
        target = s["labels"][1:n]
        keep = target != IGNORE
        total = total + F.cross_entropy(logits[b, :n - 1][keep].float(), target[keep], reduction="sum")
    return total


def test_zero2_sgd_two_steps_match_hand_reference(setup):
    from fastground.model.stages import set_stage
    records = setup["records"]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    model = GroundingGPT.from_pretrained(setup["init"]).train()
    tok = load_tokenizer(setup["init"])
    trainable = set_stage(model, STAGE)
    init = {n: p.detach().clone() for n, p in trainable.items()}
    per_rank = [_rank_micro_batches(model, tok, setup["demo"], r) for r in range(WORLD)]
    wrong = []  # every disagreement, so a failure says which quantities are off
    for step in range(STEPS):
        micro = [per_rank[r][step * ACCUM + k] for r in range(WORLD) for k in range(ACCUM)]
        count = sum(int((s["labels"][1:] != IGNORE).sum()) for m in micro for s in m)
        per_micro = [sum(int((s["labels"][1:] != IGNORE).sum()) for s in m) for m in micro]
        assert len(set(per_micro)) > 1  # unequal micro-batches: mean of means would differ
        model.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for m in micro:
            nll = _summed_nll(model, m, tok.pad_token_id)
            (nll / count).backward()
            loss_sum += nll.item()
        grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in trainable.items()}
        norm = math.sqrt(sum(g.double().pow(2).sum().item() for g in grads.values()))
        assert norm > 2 * CLIP  # the threshold binds
        rec = records[step]
        if rec["answer_tokens"] != count:
            wrong.append(f"step {step + 1}: answer tokens {rec['answer_tokens']}, counted {count}")
        if abs(rec["grad_norm"] - norm) > 1e-4 * norm:  # the reduced gradient's size, before clipping
            wrong.append(f"step {step + 1}: gradient norm {rec['grad_norm']:.6g}, reference {norm:.6g}")
        if abs(rec["loss"] - loss_sum / count) > 1e-5 * loss_sum / count:
            wrong.append(f"step {step + 1}: loss {rec['loss']:.7g}, reference {loss_sum / count:.7g}")
        coef = min(1.0, CLIP / (norm + 1e-6))
        with torch.no_grad():
            for n, p in trainable.items():
                p -= rec["lr"] * coef * grads[n]
    got = GroundingGPT.from_pretrained(setup["final"]).state_dict()
    err = upd = 0.0
    for n, p in trainable.items():
        err += (got[n].double() - p.detach().double()).pow(2).sum().item()
        upd += (p.detach().double() - init[n].double()).pow(2).sum().item()
        assert not torch.equal(got[n], init[n]), f"{n} did not move"
    if math.sqrt(err / upd) > 1e-3:
        wrong.append(f"final weights: relative error of the update {math.sqrt(err / upd):.3g}")
    assert not wrong, "; ".join(wrong)
