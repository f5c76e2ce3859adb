"""Training: `python -m fastground.train --stage {1,2,3}` (see docs/TRAINING.md)."""
from fastground.train.config import TrainConfig

__all__ = ["TrainConfig", "train", "parse_config"]


def train(cfg: TrainConfig):
    """Run one stage in this process (a 1-rank process group is made when no launcher set one up)."""
    from fastground.train.engine import train as _train
    return _train(cfg)


def parse_config(argv=None, world_size=None) -> TrainConfig:
    from fastground.train.cli import parse_config as _parse
    return _parse(argv, world_size)
