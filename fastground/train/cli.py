"""`python -m fastground.train`: options from TrainConfig, validated before any work starts.

Precedence: command line > --config file > per-stage defaults (Table 9, or the tiny demo's).
Everything that can be checked without loading a model is checked here, so a typo costs a
second, not a cluster allocation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from typing import Any, Sequence

from fastground.train.config import TrainConfig, check_types, load_config_file

PROG = "python -m fastground.train"

EPILOG = """\
examples:
  python -m fastground.train --stage 1            # tiny model, demo data, CPU or GPU; runs/stage1
  python -m fastground.train --stage 3 --max-steps 20
  deepspeed --num_gpus 8 --module fastground.train --stage 1 --model vicuna-7b-v1.5 \\
      --vision-tower clip-vit-large-patch14-336 --eva eva_vit_g.pth \\
      --qformer blip2_pretrained_flant5xxl.pth --imagebind imagebind_huge.pth \\
      --data stage1.json --image-folder data/images --video-folder data/videos \\
      --sound-folder data/sounds --output runs/stage1
  (see docs/TRAINING.md for torchrun and multi-node launches)
"""


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and why."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Train GroundingGPT, one coarse-to-fine stage at a time "
        "(DeepSpeed ZeRO-2, Table 9 settings per stage). With no option: the tiny preset on the "
        "embedded demo data, a few minutes on CPU.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        argument_default=argparse.SUPPRESS)
    p.add_argument("--config", metavar="FILE",
                   help="YAML or JSON file of option: value (names as below, dashes or underscores); "
                        "command-line options override it")
    for f in fields(TrainConfig):
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        flag = "--" + f.name.replace("_", "-")
        ftype = str(f.type)
        kwargs: dict[str, Any] = dict(help=help_text + _default_note(f.default))
        if ftype.startswith("bool"):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = int if ftype.startswith("int") else float if ftype.startswith("float") else str
            kwargs["metavar"] = None if "choices" in meta else _metavar(f.name, kwargs["type"])
        kwargs.update(meta)
        if kwargs.get("metavar") is None:
            kwargs.pop("metavar", None)
        p.add_argument(flag, dest=f.name, **kwargs)
    # The deepspeed launcher appends --local_rank=N unless told --no_local_rank; ranks are
    # read from the environment it also sets.
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, metavar="N",
                   help="set by the deepspeed launcher; ignored (ranks come from the environment)")
    return p


_DIRS = ("model", "tokenizer", "vision_tower", "image_folder", "video_folder", "sound_folder", "demo_data",
         "output", "resume")
_FILES = ("eva", "qformer", "imagebind", "deepspeed_config")


def _metavar(name: str, kind: type) -> str:
    if name in _DIRS:
        return "DIR"
    if name in _FILES:
        return "FILE"
    if name in ("data", "prev_data"):
        return "JSON[,JSON...]"
    return {int: "N", float: "X"}.get(kind, "NAME")


def _default_note(default: Any) -> str:
    if default is None or isinstance(default, bool):
        return ""
    return f" (default: {default})"


def world_size_from_env() -> int:
    """The launchers (deepspeed, torchrun, mpirun via DeepSpeed) export WORLD_SIZE."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        v = os.environ.get(var)
        if v and v.isdigit() and int(v) > 0:
            return int(v)
    return 1


def parse_config(argv: Sequence[str] | None = None, world_size: int | None = None) -> TrainConfig:
    """Command line -> resolved, validated TrainConfig. Raises ConfigError (argparse errors
    exit through SystemExit, as usual)."""
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    ns.pop("local_rank", None)
    values: dict[str, Any] = {}
    config_file = ns.pop("config", None)
    try:
        if config_file is not None:
            file_values = check_types(load_config_file(config_file), f"--config {config_file}")
            values.update(file_values)
        values.update(ns)
        cfg = TrainConfig(**values)
        return validate(cfg, world_size if world_size is not None else world_size_from_env())
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _files(spec: str | None) -> list[str]:
    return [s.strip() for s in spec.split(",") if s.strip()] if spec else []


def _check_json_list(opt: str, path: str) -> None:
    """A data file must parse before any model is built; entries are checked lazily later."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{opt}: {path} is not valid JSON ({e})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{opt}: {path} is not UTF-8 text ({e})") from None
    if not isinstance(data, list):
        raise ConfigError(f"{opt}: {path} must hold a JSON list of samples, not a {type(data).__name__}")


def validate(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """Every check that needs no model and no data loading."""
    if cfg.stage not in (1, 2, 3):
        raise ConfigError(f"stage must be 1, 2 or 3, got {cfg.stage!r}")
    for opt, spec in (("--data", cfg.data), ("--prev-data", cfg.prev_data)):
        if spec is not None and not _files(spec):
            raise ConfigError(f"{opt}: no file given")
        for path in _files(spec):
            if not os.path.isfile(path):
                raise ConfigError(f"{opt}: data file not found: {path}")
            _check_json_list(opt, path)
    for opt, path in (("--image-folder", cfg.image_folder), ("--video-folder", cfg.video_folder),
                      ("--sound-folder", cfg.sound_folder)):
        if path is not None and not os.path.isdir(path):
            raise ConfigError(f"{opt}: folder not found: {path}")
    for opt, path in (("--eva", cfg.eva), ("--qformer", cfg.qformer), ("--imagebind", cfg.imagebind),
                      ("--deepspeed-config", cfg.deepspeed_config)):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{opt}: file not found: {path}")
    for opt, path in (("--model", cfg.model), ("--tokenizer", cfg.tokenizer),
                      ("--vision-tower", cfg.vision_tower)):
        if path is not None and not os.path.isdir(path):
            raise ConfigError(f"{opt}: directory not found: {path}")
    if cfg.model is not None and not os.path.isfile(os.path.join(cfg.model, "config.json")):
        raise ConfigError(f"--model {cfg.model}: no config.json (expected a release-layout checkpoint "
                          "or a Vicuna/Llama directory)")
    if cfg.model is not None:
        with open(os.path.join(cfg.model, "config.json")) as f:
            try:
                model_type = json.load(f).get("model_type")
            except json.JSONDecodeError as e:
                raise ConfigError(f"--model {cfg.model}: config.json is not valid JSON ({e})") from None
        if model_type == "llama":
            lacking = [o for o, v in (("--vision-tower", cfg.vision_tower), ("--eva", cfg.eva),
                                      ("--qformer", cfg.qformer), ("--imagebind", cfg.imagebind)) if v is None]
            if lacking:
                raise ConfigError(f"--model {cfg.model} is a Vicuna/Llama directory: the encoders need "
                                  f"{' '.join(lacking)}")
        elif model_type != "LEGO":
            raise ConfigError(f"--model {cfg.model}: model_type {model_type!r} is neither a GroundingGPT "
                              "release checkpoint (LEGO) nor a Vicuna/Llama directory (llama)")
    if cfg.alpha is not None:
        if not 0.0 <= cfg.alpha < 1.0:
            raise ConfigError(f"--alpha must be in [0, 1), got {cfg.alpha}")
        if cfg.alpha > 0 and cfg.prev_data is None and (cfg.data is not None or cfg.stage == 1):
            raise ConfigError(f"--alpha {cfg.alpha} replays previous-stage data, but no --prev-data is given")
    if cfg.stage == 1 and cfg.lora:
        raise ConfigError("--lora applies to the LLM, which stage 1 keeps frozen; use it in stage 2 or 3")
    positive = {"max_steps": cfg.max_steps, "stop_after": cfg.stop_after, "epochs": cfg.epochs,
                "lr": cfg.lr, "max_length": cfg.max_length, "log_every": cfg.log_every,
                "keep_last": cfg.keep_last, "lora_r": cfg.lora_r}
    for name, v in positive.items():
        if v is not None and v <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {v}")
    for name in ("save_every", "weight_decay", "max_grad_norm", "warmup_ratio"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.warmup_ratio >= 1:
        raise ConfigError(f"--warmup-ratio must be below 1, got {cfg.warmup_ratio}")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {cfg.num_workers}")
    from fastground.train.loss_reduction import check_packing
    check_packing(cfg.loss_reduction, cfg.packed)  # release: padded micro-batches only
    from fastground.config import PRESETS
    if cfg.preset is not None and cfg.preset not in PRESETS:
        raise ConfigError(f"--preset {cfg.preset!r} is unknown; choose one of {', '.join(sorted(PRESETS))}")
    if cfg.resume is not None and cfg.resume != "latest" and not os.path.isdir(cfg.resume):
        raise ConfigError(f"--resume: checkpoint directory not found: {cfg.resume}")
    from fastground.train.guards import check_settings
    check_settings(cfg)  # finite numbers in range, optional packages, DeepSpeed JSON types
    if cfg.deepspeed_config is not None:
        from fastground.train.engine import check_user_deepspeed_config
        check_user_deepspeed_config(cfg.deepspeed_config)
    try:
        resolved = cfg.resolve(world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if resolved.stop_after is not None and resolved.max_steps is not None and resolved.stop_after > resolved.max_steps:
        raise ConfigError(f"--stop-after {resolved.stop_after} is beyond --max-steps {resolved.max_steps}")
    return resolved


def rank_from_env() -> int:
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        v = os.environ.get(var)
        if v and v.isdigit():
            return int(v)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from fastground.train import guards, output_dir
    lock = None
    try:
        cfg = parse_config(argv)
        world, rank = world_size_from_env(), rank_from_env()
        guards.preflight(cfg, world, rank)
        if rank == 0:
            # Last of the checks, since it creates the output directory.
            output_dir.new_run_id()
            lock = output_dir.acquire(cfg.output_dir())
    except (ConfigError, output_dir.OutputBusyError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    from fastground.data.dataset import DataError
    from fastground.train.checkpoint import CheckpointError
    from fastground.train.engine import ResumeError, train
    try:
        train(cfg)
    except (DataError, ResumeError, CheckpointError) as e:
        # Expected ways a run can stop on its inputs: one clear line, not a traceback.
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except FloatingPointError as e:
        print(f"{PROG}: error: {e}; the checkpoints written so far are kept (--resume continues the last one)",
              file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.release()
    return 0
