"""The one table of parts (fastground.model.branches) covers the whole model and is what
stage freezing, patch and the parameter report act on."""
import torch

from fastground import GroundingGPT, GroundingGPTConfig
from fastground.model.branches import PARTS, fast_swaps, frozen_modules, part_of
from fastground.model.stages import parameter_report, set_stage


def _model():
    torch.manual_seed(0)
    return GroundingGPT(GroundingGPTConfig.from_preset("tiny"))


def test_every_parameter_belongs_to_exactly_one_part():
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    for n in names:
        owners = [p.name for p in PARTS if p.owns(n)]
        assert len(owners) == 1, (n, owners)
    # and every part names something that exists
    for p in PARTS:
        assert any(p.owns(n) for n in names), p.name
    report = parameter_report(model)
    assert "other" not in report
    assert sum(v for k, v in report.items() if k != "total") == report["total"]


def test_stages_follow_the_table():
    model = _model()
    for stage in (1, 2, 3):
        trainable = set_stage(model, stage)
        for n, prm in model.named_parameters():
            part = part_of(n)
            expect = part.trains_from is not None and stage >= part.trains_from
            assert (n in trainable) == expect == prm.requires_grad, (stage, n)


def test_frozen_modules_stay_in_eval_and_patch_swaps_the_tables_modules():
    from fastground.fast.patching import patch, unpatch
    model = _model()
    model.train()
    for name in frozen_modules():
        assert not getattr(model.model, name).training, name
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {n: type(getattr(model.model, n)) for n in fast_swaps("qformer") + fast_swaps("linear")}
    patch(model)
    for n, cls in classes.items():
        assert type(getattr(model.model, n)) is not cls, n
    unpatch(model)
    for n, cls in classes.items():
        assert type(getattr(model.model, n)) is cls, n
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
