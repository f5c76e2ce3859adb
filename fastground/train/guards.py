"""Checks a training run makes before it builds a model, and the stops it honours after.

Before (`preflight`, called by `python -m fastground.train` ahead of any model or data
work; each failure is one ConfigError line, exit code 2):
  * settings: finite numbers in range, optional packages the options need, the types of a
    user DeepSpeed JSON;
  * the data: at least one sample with an answer turn (a data set without any would train
    at loss 0 and export an untrained model);
  * resume compatibility: the checkpoint `--resume` would load (the newest intact one) was
    written by a run with the same starting weights (fingerprint), stage, preset, world
    size, data (content fingerprint), alpha, learning rate, schedule and every optimizer
    and batch setting; every difference is named on the one line;
  * the output directory: writable, with free space for one checkpoint (estimated from the
    trainable parameters of a model built on the meta device, which allocates nothing).

After (`StopOnSignal`, `check_skip_fraction`): Ctrl-C / SIGTERM finish the current step,
save and exit 0, a second Ctrl-C exits at once; the whole run's skipped-sample fraction is
checked at every epoch's end.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import sys
from fastground.train.config import TrainConfig

log = logging.getLogger("fastground.train")


def _error(msg: str):
    from fastground.train.cli import ConfigError
    return ConfigError(msg)


# ---------------------------------------------------------------------------- settings
# (name, lowest, highest, lowest included, highest included); None: unbounded on that side.
RANGES = {
    "lr": (0.0, None, False, True),
    "alpha": (0.0, 1.0, True, False),
    "warmup_ratio": (0.0, 1.0, True, False),
    "weight_decay": (0.0, None, True, True),
    "adam_beta1": (0.0, 1.0, True, False),
    "adam_beta2": (0.0, 1.0, True, False),
    "adam_eps": (0.0, None, False, True),
    "max_grad_norm": (0.0, None, True, True),
    "lora_dropout": (0.0, 1.0, True, False),
    "max_bad_fraction": (0.0, 1.0, True, True),
    "peak_tflops": (0.0, None, False, True),
}


def check_settings(cfg: TrainConfig) -> None:
    for name, (lo, hi, lo_in, hi_in) in RANGES.items():
        v = getattr(cfg, name)
        if v is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _error(f"{flag} must be a finite number, got {v!r}")
        ok_lo = lo is None or (v >= lo if lo_in else v > lo)
        ok_hi = hi is None or (v <= hi if hi_in else v < hi)
        if not (ok_lo and ok_hi):
            rng = f"{'[' if lo_in else '('}{lo if lo is not None else '-inf'}, " \
                  f"{hi if hi is not None else 'inf'}{']' if hi_in else ')'}"
            raise _error(f"{flag} must be in {rng}, got {v}")
    if cfg.lora_alpha is not None and cfg.lora_alpha <= 0:
        raise _error(f"--lora-alpha must be positive, got {cfg.lora_alpha}")
    needs = []  # (module, option, package)
    if cfg.lora:
        needs.append(("peft", "--lora", "peft"))
    if cfg.video_backend == "dali":
        needs.append(("nvidia.dali", "--video-backend dali", "nvidia-dali-cuda120"))
    for module, opt, package in needs:
        if not _importable(module):
            raise _error(f"{opt} needs the {package} package, which is not installed (pip install {package})")
    if cfg.deepspeed_config is not None:
        check_deepspeed_types(cfg.deepspeed_config)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


_DS_INT = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
           "steps_per_print")
_DS_NUM = ("gradient_clipping",)
_DS_BOOL = ("wall_clock_breakdown", "zero_allow_untested_optimizer", "prescale_gradients")
_DS_SECTIONS = ("zero_optimization", "bf16", "fp16", "optimizer", "scheduler", "activation_checkpointing")
_ZERO_INT = ("stage",)
_ZERO_NUM = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size")
_ZERO_BOOL = ("overlap_comm", "contiguous_gradients", "reduce_scatter", "allgather_partitions",
              "round_robin_gradients")


def check_deepspeed_types(path: str) -> dict:
    """The fields DeepSpeed would reject later (or misread) checked for their types now."""
    try:
        with open(path, encoding="utf-8") as f:
            user = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _error(f"--deepspeed-config {path}: cannot read JSON ({e})") from None
    if not isinstance(user, dict):
        raise _error(f"--deepspeed-config {path}: expected a JSON object, got a {type(user).__name__}")
    problems = []

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def check(section: dict, prefix: str, ints=(), nums=(), bools=()):
        for k in ints:
            if k in section and section[k] != "auto" and not (is_int(section[k]) and section[k] >= 0):
                problems.append(f"{prefix}{k} must be a non-negative integer or \"auto\", got {section[k]!r}")
        for k in nums:
            if k in section and section[k] != "auto" and not (is_num(section[k]) and section[k] >= 0):
                problems.append(f"{prefix}{k} must be a non-negative number or \"auto\", got {section[k]!r}")
        for k in bools:
            if k in section and not isinstance(section[k], bool):
                problems.append(f"{prefix}{k} must be true or false, got {section[k]!r}")

    check(user, "", _DS_INT, _DS_NUM, _DS_BOOL)
    for sec in _DS_SECTIONS:
        if sec in user and not isinstance(user[sec], dict):
            problems.append(f"{sec} must be an object, got {user[sec]!r}")
    zero = user.get("zero_optimization")
    if isinstance(zero, dict):
        check(zero, "zero_optimization.", _ZERO_INT, _ZERO_NUM, _ZERO_BOOL)
    for sec in ("bf16", "fp16"):
        s = user.get(sec)
        if isinstance(s, dict) and "enabled" in s and s["enabled"] not in (True, False, "auto"):
            problems.append(f"{sec}.enabled must be true, false or \"auto\", got {s['enabled']!r}")
    for sec in ("optimizer", "scheduler"):
        s = user.get(sec)
        if isinstance(s, dict):
            if not isinstance(s.get("type"), str):
                problems.append(f"{sec}.type must be a string, got {s.get('type')!r}")
            if "params" in s and not isinstance(s["params"], dict):
                problems.append(f"{sec}.params must be an object, got {s['params']!r}")
    if problems:
        raise _error(f"--deepspeed-config {path}: " + "; ".join(problems))
    return user


# ---------------------------------------------------------------------------- data
def data_files(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """(this stage's JSON files, the replayed previous stage's) as the run will read them."""
    from fastground.train.data import demo_paths, split_files
    data, prev = split_files(cfg.data), split_files(cfg.prev_data)
    if cfg.data is None:
        demo = demo_paths(cfg.demo_data, cfg.stage)
        data = [demo["data"]]
        if cfg.prev_data is None and (cfg.alpha or 0) > 0 and demo["prev_data"]:
            prev = [demo["prev_data"]]
    return data, prev


def check_data_has_answers(cfg: TrainConfig) -> None:
    """At least one entry with an assistant turn; without any, every sample would have no
    answer token and the run would train nothing at loss 0."""
    files, _ = data_files(cfg)
    if cfg.data is None:
        return  # the demo set, generated by the run
    total = with_answer = 0
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                entries = json.load(f)
        except (OSError, ValueError):
            return  # the CLI's own check reports an unreadable file
        for e in entries if isinstance(entries, list) else []:
            total += 1
            conv = e.get("conversations") if isinstance(e, dict) else None
            if isinstance(conv, list) and any(isinstance(t, dict) and t.get("from") == "gpt"
                                              and isinstance(t.get("value"), str) for t in conv):
                with_answer += 1
    if total and not with_answer:
        raise _error(f"--data {cfg.data}: none of the {total} samples has an answer turn "
                     "(\"from\": \"gpt\"), so there is no answer token to train on")


def file_digest(path: str, whole: bool = True) -> str:
    """sha256 of a file, or of its size, first and last MiB (weights: cheap, and a changed
    file almost surely changes one of the three)."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if whole or size <= 2 * 2**20:
            for block in iter(lambda: f.read(2**22), b""):
                h.update(block)
        else:
            h.update(f.read(2**20))
            f.seek(-2**20, os.SEEK_END)
            h.update(f.read(2**20))
    return h.hexdigest()[:16]


_WEIGHT_EXT = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model")


def weights_fingerprint(path: str | None) -> str | None:
    if path is None:
        return None
    if os.path.isfile(path):
        return f"{os.path.basename(path)}:{file_digest(path, whole=False)}"
    parts = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full) and name.endswith(_WEIGHT_EXT):
            parts.append(f"{name}:{file_digest(full, whole=name.endswith('.json'))}")
    return hashlib.sha256(";".join(parts).encode()).hexdigest()[:16]


def fingerprint(cfg: TrainConfig) -> dict:
    """What the run starts from, by content: recorded in every checkpoint, compared on resume."""
    start = cfg.starting_point()
    data, prev = data_files(cfg)
    return {
        "start": (f"preset {cfg.model_preset()} seed {cfg.seed}" if start is None
                  else f"weights {weights_fingerprint(start)}"),
        "encoders": {k: weights_fingerprint(getattr(cfg, k)) for k in ("vision_tower", "eva", "qformer", "imagebind")
                     if getattr(cfg, k)},
        "data": [file_digest(p) for p in data if os.path.isfile(p)],
        "prev_data": [file_digest(p) for p in prev if os.path.isfile(p)],
    }


# ---------------------------------------------------------------------------- resume
# Settings that define the optimisation a resumed run continues; any change is refused.
RESUME_SAME = ("stage", "alpha", "lr", "warmup_ratio", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps",
               "max_grad_norm", "global_batch", "micro_batch", "grad_accum", "seed", "lora", "lora_r",
               "lora_alpha", "lora_dropout", "max_steps", "epochs", "zero_stage", "max_length", "precision",
               "video_backend")


def _resolved_precision(cfg: TrainConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    import torch
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def check_resume(cfg: TrainConfig, world: int, positions: int | None) -> str | None:
    """The checkpoint this run will resume from (None: none, the run starts at step 0);
    refuses one whose run differs from this one."""
    from fastground.train import checkpoint as ckpt
    if cfg.resume is None:
        return None
    try:
        path = ckpt.find_resume_checkpoint(cfg.resume, cfg.output_dir())
    except ValueError as e:
        raise _error(str(e)) from None
    if path is None:
        return None
    with open(os.path.join(path, ckpt.STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    saved = state.get("settings", {})
    now = dict(cfg.to_dict(), world_size=world, precision=_resolved_precision(cfg))
    if positions is not None and now["max_length"] is not None:
        now["max_length"] = min(now["max_length"], positions)
    diffs = []
    if "world_size" in saved and saved["world_size"] != world:
        diffs.append(f"world size: saved {saved['world_size']}, now {world}")
    for k in RESUME_SAME:
        if k in saved and saved[k] != now.get(k):
            diffs.append(f"{k}: saved {saved[k]!r}, now {now.get(k)!r}")
    fp_saved = saved.get("fingerprint")
    if fp_saved:
        fp_now = fingerprint(cfg)
        names = {"start": "starting weights", "encoders": "encoder weights", "data": "--data content",
                 "prev_data": "--prev-data content"}
        for k, name in names.items():
            if fp_saved.get(k) != fp_now.get(k):
                diffs.append(f"{name}: saved {fp_saved.get(k)}, now {fp_now.get(k)}")
    if diffs:
        raise _error(f"cannot resume from {path}: " + "; ".join(diffs) +
                     ". Start a new run (another --output, or without --resume) or restore those settings")
    return path


# ---------------------------------------------------------------------------- output
def model_config(cfg: TrainConfig):
    """The model config the run will build, read without building anything."""
    from fastground.config import GroundingGPTConfig
    start = cfg.starting_point()
    if start is None:
        return GroundingGPTConfig.from_preset(cfg.preset or "tiny")
    try:
        with open(os.path.join(start, "config.json"), encoding="utf-8") as f:
            d = json.load(f)
        if d.get("model_type") == "llama":
            keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
            preset = cfg.preset or ("groundinggpt-13b" if d.get("hidden_size") == 5120 else "groundinggpt-7b")
            return GroundingGPTConfig.from_preset(preset, **{k: d[k] for k in keep if k in d})
        return GroundingGPTConfig.from_release_dict(d)
    except (OSError, ValueError, TypeError):
        return None


def checkpoint_bytes(cfg: TrainConfig, mcfg) -> int:
    """Bytes of one checkpoint: trainable weights (bf16 or fp32) + fp32 master copy + two
    Adam moments, counted on a meta-device model."""
    import torch
    from fastground.model.groundinggpt import GroundingGPT
    from fastground.model.stages import set_stage
    with torch.device("meta"):
        model = GroundingGPT(mcfg)
    trainable = set_stage(model, cfg.stage)
    n = sum(p.numel() for p in trainable.values())
    if cfg.lora:
        from fastground.model.stages import LLM_PREFIXES
        llm = sum(p.numel() for k, p in trainable.items() if k.startswith(LLM_PREFIXES))
        n -= llm
        n += int(llm * 2 * cfg.lora_r / max(1, mcfg.hidden_size))  # rough: A and B per target
    return n * (4 + 12)


def check_output(cfg: TrainConfig, mcfg) -> None:
    output = os.path.abspath(cfg.output_dir())
    probe = output
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise _error(f"--output {cfg.output_dir()}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise _error(f"--output {cfg.output_dir()}: {probe} is not writable")
    if mcfg is None:
        return
    try:
        need = checkpoint_bytes(cfg, mcfg)
    except Exception as e:  # an estimate must never stop a run by itself
        log.debug("no checkpoint size estimate: %s", e)
        return
    free = shutil.disk_usage(probe).free
    if free < need:
        raise _error(f"--output {cfg.output_dir()}: {_gib(free)} free, one checkpoint needs about {_gib(need)} "
                     "(trainable weights, fp32 master copy and Adam moments); free space or choose another --output")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def preflight(cfg: TrainConfig, world: int, rank: int) -> str | None:
    """Every check that needs no model; returns the checkpoint a --resume will load."""
    check_settings(cfg)
    check_data_has_answers(cfg)
    mcfg = model_config(cfg)
    resume = check_resume(cfg, world, mcfg.max_position_embeddings if mcfg is not None else None)
    if rank == 0:
        check_output(cfg, mcfg)
    return resume


# ---------------------------------------------------------------------------- after the start
def epoch_ended(run) -> bool:
    """Whether the step just done was the last of an epoch (or of the run)."""
    if run.step >= run.stop:
        return True
    try:
        return run.td.batches.locate(run.step)[1] == 0
    except (AttributeError, TypeError, ValueError):
        return False


def check_skip_fraction(run, force: bool = False) -> None:
    """The whole run's fraction of skipped samples, checked at each epoch's end (the dataset
    checks its own, per process, on every sample)."""
    from fastground.data.dataset import DataError
    if not (force or epoch_ended(run)):
        return
    skipped, samples = run.counters.get("skipped", 0), run.counters.get("samples", 0)
    limit = run.cfg.max_bad_fraction
    tried = skipped + samples
    if tried and skipped / tried > limit:
        raise DataError(f"{skipped} of {tried} samples tried were skipped ({skipped / tried:.1%} > "
                        f"--max-bad-fraction {limit:.1%}) by step {run.step}; the warnings above name each "
                        "sample and file")


class StopOnSignal:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step (it saves a checkpoint
    and returns normally); a second Ctrl-C exits at once (status 130)."""

    def __init__(self):
        self.flag = False
        self._old: dict = {}

    def _handler(self, signum, frame):
        if self.flag and signum == signal.SIGINT:
            print("\ninterrupted again: exiting now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(130)
        self.flag = True
        name = signal.Signals(signum).name
        print(f"\n{name}: finishing this step, then writing a checkpoint and exiting "
              "(Ctrl-C again to exit at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def requested(self, device=None) -> bool:
        """Agreed by every rank: one asked rank stops them all at the same step."""
        import torch
        import torch.distributed as dist
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([1.0 if self.flag else 0.0], device=device or "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return bool(t.item() > 0)
        return self.flag
