"""`python -m fastground.info --preset groundinggpt-7b`: parameters per branch, built on
the meta device (no memory, seconds)."""
from __future__ import annotations

import argparse
import time

import torch

from fastground.config import PRESETS, GroundingGPTConfig
from fastground.model.groundinggpt import GroundingGPT
from fastground.model.stages import parameter_report, trainable_parameters


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fastground.info", description=__doc__)
    ap.add_argument("--preset", default="groundinggpt-7b", choices=sorted(PRESETS))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = GroundingGPT(GroundingGPTConfig.from_preset(args.preset))
    built = time.perf_counter() - t0
    print(f"{args.preset}: built on the meta device in {built:.1f} s")
    for name, n in parameter_report(model).items():
        print(f"  {name:36s} {n / 1e6:10.1f} M")
    for stage in (1, 2, 3):
        n = sum(p.numel() for p in trainable_parameters(model, stage).values())
        print(f"  trainable in stage {stage}: {n / 1e6:10.1f} M")


if __name__ == "__main__":
    main()
