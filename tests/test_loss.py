"""The training loss, checked against cross-entropy written out by hand (no F.cross_entropy,
no shared helper): a 3-token example worked on paper, padded and packed batches token by
token, and the trainer's per-step normalisation over micro-batches against a count of
supervised tokens made here from the samples' labels."""
import math
import types

import pytest
import torch

from fastground import GroundingGPT, GroundingGPTConfig
from fastground.data.collate import collate_packed, collate_padded
from fastground.testing import media_block, media_tensor, with_token_ids

IGNORE = -100


def tiny_model(seed=0, **overrides):
    cfg = with_token_ids(GroundingGPTConfig.from_preset("tiny", qformer_hidden_dropout=0.0,
                                                        qformer_attention_dropout=0.0, **overrides))
    torch.manual_seed(seed)
    return GroundingGPT(cfg)


def nll(row_logits, target: int) -> float:
    """-log softmax(row)[target], in float64 from the definition."""
    row = [float(v) for v in row_logits]
    top = max(row)
    return top + math.log(sum(math.exp(v - top) for v in row)) - row[target]


def hand_sum_and_count(logits, labels):
    """Sum of next-token NLLs and the number of supervised targets of ONE sequence:
    the logits at position t predict labels[t + 1]."""
    total, count = 0.0, 0
    for t in range(len(labels) - 1):
        target = int(labels[t + 1])
        if target != IGNORE:
            total += nll(logits[t], target)
            count += 1
    return total, count


# ---------------------------------------------------------------------------- 3 tokens on paper
def test_three_token_example_worked_by_hand():
    """Sequence [a, b, c] with labels [-100, 2, 0] over a vocabulary of 16:
    position 0 must predict token 2, position 1 token 0, position 2 predicts nothing.
    Logits: row 0 is 0 everywhere except ln 2 at index 2 -> p = 2 / (15 + 2), NLL ln(17/2);
    row 1 is 0 everywhere except ln 3 at index 0 -> p = 3 / (15 + 3), NLL ln 6;
    row 2 is anything. Loss = (ln 8.5 + ln 6) / 2 = ln(51) / 2 = 1.96591...
    The model's lm_head is set so that it produces exactly these logits from the hidden
    states the backbone gives for this input (least-squares solve in float64)."""
    model = tiny_model(vocab_size=16).double().eval()
    ids = torch.tensor([[3, 4, 5]])
    labels = torch.tensor([[IGNORE, 2, 0]])
    want = torch.zeros(3, 16, dtype=torch.float64)
    want[0, 2] = math.log(2)
    want[1, 0] = math.log(3)
    want[2, 7] = 5.0  # would be a large loss if (wrongly) used
    with torch.no_grad():
        hidden = model.model(inputs_embeds=model.model.embed_tokens(ids)).last_hidden_state[0]  # (3, H)
        model.lm_head.weight.copy_(torch.linalg.lstsq(hidden, want).solution.T)
    out = model(ids, labels=labels)
    assert torch.allclose(out.logits[0], want, atol=1e-9)  # the setup did what it says
    assert out.n_tokens == 2
    # the loss is computed in float32 whatever the weights' dtype
    assert abs(out.loss.item() - math.log(51) / 2) < 1e-6, out.loss.item()
    assert abs(math.log(51) / 2 - 1.9659137) < 1e-6


# ---------------------------------------------------------------------------- real batches
def samples(cfg):
    """Answers in different places: at the very end (next to padding), in the middle, right
    after a media block, a sample supervised from its first token (which packing must not
    let the previous sample predict), a sample with no answer at all."""
    g = torch.Generator().manual_seed(5)

    def words(n):
        return torch.randint(3, cfg.vocab_size - 9, (n,), generator=g).tolist()

    spec = [("image", [(9, 14)]), (None, [(0, 5), (8, 10)]), ("video", [(3, 100)]), ("sound", [(2, 6)]),
            (None, []), (None, [(1, 100)])]
    out = []
    for i, (modality, spans) in enumerate(spec):
        ids = torch.tensor([cfg.bos_token_id] + words(2) + (media_block(cfg, modality) if modality else [])
                           + words(5 + 2 * i))
        labels = torch.full_like(ids, IGNORE)
        for a, b in spans:
            labels[a:b] = ids[a:b]
        s = {"id": str(i), "input_ids": ids, "labels": labels, "image": None, "video": None, "sound": None}
        if modality:
            s[modality] = media_tensor(cfg, modality, 1, g)[0]
        out.append(s)
    return out


def _trainer_batch(batch, model):
    """The batch as the trainer's collate finishes it (answer positions and targets counted
    on the CPU), which the model's loss then uses instead of the labels."""
    from fastground.train.data import finish_batch
    return finish_batch(dict(batch), model.config)


ROUTES = ["labels", "trainer-collate", "trainer-collate-fused"]


def _loss_via(model, batch, route):
    model.fused_loss = route.endswith("fused")
    try:
        if route != "labels":
            batch = {k: v for k, v in _trainer_batch(batch, model).items() if not k.startswith("_")}
        out = model(**batch)
        logits = model(**batch, return_logits=True).logits if out.logits is None else out.logits
    finally:
        model.fused_loss = False
    return out, logits


@pytest.mark.parametrize("route", ROUTES)
def test_padded_batch_loss_is_hand_cross_entropy(route):
    model = tiny_model().eval()
    ss = samples(model.config)
    out, logits = _loss_via(model, collate_padded(ss, model.config.pad_token_id), route)
    total, count = 0.0, 0
    for b, s in enumerate(ss):
        n = s["input_ids"].numel()
        t, c = hand_sum_and_count(logits[b, :n].detach().double(), s["labels"])
        total, count = total + t, count + c
    assert out.n_tokens == count == sum(int((s["labels"][1:] != IGNORE).sum()) for s in ss)
    assert abs(out.loss.item() - total / count) < 1e-5 * total / count, (out.loss.item(), total / count)


@pytest.mark.parametrize("route", ROUTES)
def test_packed_batch_loss_is_hand_cross_entropy(route):
    model = tiny_model().eval()
    ss = samples(model.config)
    batch = collate_packed(ss)
    out, logits = _loss_via(model, batch, route)
    assert logits.shape[:2] == batch["input_ids"].shape
    total, count, start = 0.0, 0, 0
    for s in ss:
        n = s["input_ids"].numel()
        # each sample on its own: its first token is nobody's target
        t, c = hand_sum_and_count(logits[0, start:start + n].detach().double(), s["labels"])
        total, count, start = total + t, count + c, start + n
    assert out.n_tokens == count
    assert abs(out.loss.item() - total / count) < 1e-5 * total / count, (out.loss.item(), total / count)


# ---------------------------------------------------------------------------- trainer normalisation
class RecordingEngine:
    """Stands in for the DeepSpeed engine of one rank: runs the module, backpropagates what
    the trainer hands to backward() as it is (scale_wrt_gas=False) and counts steps."""

    def __init__(self, module):
        self.module = module
        self.backward_calls = 0
        self.step_calls = 0

    def __call__(self, **batch):
        return self.module(**batch)

    def backward(self, loss, scale_wrt_gas=True, **_):
        assert scale_wrt_gas is False  # the trainer normalises itself; DeepSpeed must not divide again
        loss.backward()
        self.backward_calls += 1

    def step(self):
        self.step_calls += 1

    def set_gradient_accumulation_boundary(self, last):
        pass

    def get_lr(self):
        return [0.0]

    def get_global_grad_norm(self):
        return None

    def train(self, mode=True):
        self.module.train(mode)
        return self


def _run_for(engine, pad_token_id):
    from fastground.train.engine import DistInfo
    from fastground.train.config import TrainConfig
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), own_group=False)
    return types.SimpleNamespace(engine=engine, info=info, cfg=TrainConfig(packed=False), bf16=False,
                                 td=types.SimpleNamespace(pad_token_id=pad_token_id))


def test_trainer_step_normalises_by_supervised_tokens_of_the_step():
    """Two micro-batches of different answer lengths: the step's gradient must be the
    gradient of (sum of every supervised token's NLL) / (number of supervised tokens in
    both micro-batches), counted here from the samples' labels. Dividing each micro-batch
    by its own count (mean of means) or by the wrong count gives another gradient."""
    from fastground.train.data import collate
    from fastground.train.engine import train_step

    model = tiny_model(seed=1).train()  # dropout is 0: train mode is deterministic
    ss = samples(model.config)
    groups = [ss[:2], ss[2:]]  # answer tokens per micro-batch differ a lot
    counts = [sum(int((s["labels"][1:] != IGNORE).sum()) for s in g) for g in groups]
    assert counts[0] != counts[1] and min(counts) > 0
    params = [p for p in model.parameters() if p.requires_grad]

    # the expected gradient, from the hand count and a hand-written token loss
    for g in groups:
        batch = collate_padded([dict(s) for s in g], model.config.pad_token_id)
        logits = model(**batch).logits.double()
        token_nll = 0.0
        for b, s in enumerate(g):
            n = s["input_ids"].numel()
            target = s["labels"][1:n]
            keep = target != IGNORE
            lp = logits[b, :n - 1][keep].log_softmax(-1)
            token_nll = token_nll - lp.gather(1, target[keep][:, None]).sum()
        (token_nll / sum(counts)).backward()
    want = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)

    model.fused_loss = True  # the trainer's default (--fused-loss)
    engine = RecordingEngine(model)
    micro = [collate([dict(s) for s in g], model.config.pad_token_id, False, 4096) for g in groups]
    stats = train_step(_run_for(engine, model.config.pad_token_id), micro)
    assert engine.backward_calls == 2
    assert stats.answer_tokens == sum(counts)
    got = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    num = sum((a.double() - b.double()).pow(2).sum() for a, b in zip(got, want))
    den = sum(b.double().pow(2).sum() for b in want)
    assert math.sqrt(num / den) < 1e-5, math.sqrt(num / den)
