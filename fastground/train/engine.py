"""The training loop on DeepSpeed ZeRO-2.

One process per device. Without a launcher the process makes its own 1-rank process group,
so the same code path (DeepSpeed engine, ZeRO optimizer, checkpoints) runs on a laptop CPU,
one GPU, `deepspeed`/`torchrun` on 8 GPUs, and several nodes.

Loss normalisation: the loss of an optimizer step is the mean over every answer token of
the global batch (all ranks, all micro-batches), as if the global batch were one forward
pass. Each micro-batch's summed token loss is divided by the step's global token count,
known up front from the labels (one all-reduce of a few integers), and multiplied by the
world size that ZeRO's gradient averaging divides by. A mean of per-rank means would weight
a token of a short answer more than one of a long answer. `--loss-reduction release` takes
the release's mean of micro-batch means instead (fastground/train/loss_reduction.py).

Optimizer: apex FusedAdam when importable, else torch's fused AdamW on CUDA, else torch's
foreach AdamW on CPU; DeepSpeed wraps it as the client optimizer (no DeepSpeed op is JIT
compiled). Schedule: linear warm-up then cosine decay to 0, a torch LambdaLR stepped by the
engine at each optimizer step.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import socket
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fastground.data.templates import training_template
from fastground.data.tokenizer import load_tokenizer
from fastground.train.config import TrainConfig
from fastground.train.loss_reduction import check_packing, micro_batch_weight, step_loss

log = logging.getLogger("fastground.train")


# ---------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    own_group: bool  # no launcher: this process made its own 1-rank group


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> DistInfo:
    cuda = torch.cuda.is_available()
    if not cuda:
        # DeepSpeed would otherwise probe for accelerators it cannot use.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        single = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": str(_free_port())}
        for k, v in single.items():
            os.environ.setdefault(k, v)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    if get_accelerator().device_name() == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce at init (~35 s of
        # C++ compile on a fresh machine); it only serves inference all-reduce, and gloo
        # does the training collectives, so mark it unavailable. The table is read only for
        # that op (comm/torch.py); seeding it also skips probing every op builder with the
        # compiler, which prints linker errors for ops nobody asked for.
        import deepspeed.ops
        table = vars(deepspeed.ops).get("__compatible_ops__")
        if table is None:
            deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
        else:
            table["deepspeed_shm_comm"] = False
    own = not torch.distributed.is_initialized()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(rank, world, local_rank, device, own)


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def _all_reduce_max(value: int, device: torch.device) -> int:
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


# ---------------------------------------------------------------------------- CPU threads
def cpu_threads(cfg: TrainConfig, hidden_size: int) -> int:
    """Torch threads of this process on CPU. A model as narrow as the tiny demo's gives each
    op microseconds of work, which OpenMP barriers of a second thread cost more than they
    save (1 thread ran the demo 4-14x faster per step than 2 on a 2-core machine); wider
    models split the cores between the processes of this machine."""
    if cfg.cpu_threads:
        return cfg.cpu_threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    if hidden_size < 512:
        return 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1) or 1)
    return max(1, (os.cpu_count() or 1) // local)


# ---------------------------------------------------------------------------- data-parallel gradients
def branch_anchor(model) -> torch.Tensor:
    """A scalar through the trainable part of every branch on an all-zero input; the caller
    adds 0 x it to the loss, after the real forward.

    Why: a micro-batch without, say, audio gives the audio adapter no gradient, and ZeRO-2
    reduces gradients in the order their hooks fire, so ranks with different modalities
    would run mismatched collectives (gloo aborts, NCCL hangs or sums the wrong slices).
    The anchor makes every trainable tensor get a gradient on every rank. Built before the
    real forward, its autograd nodes have the lowest sequence numbers, so backward reaches
    them last, when everything else is done: each adapter's gradient is then completed, and
    its hook fires, in the anchor's order, the same on every rank whatever the batch held.
    Its gradients are exact zeros, so the update is unchanged."""
    inner, cfg = model.model, model.config
    dtype = inner.mm_vision_projector[0].weight.dtype
    device = inner.mm_vision_projector[0].weight.device
    image = inner.mm_vision_projector(torch.zeros(1, 1, cfg.clip_hidden_size, dtype=dtype, device=device))
    video = inner.video_branch(torch.zeros(1, 1, cfg.num_query_token, cfg.qformer_hidden_size, dtype=dtype,
                                           device=device))
    sound = inner.audio_branch(torch.zeros(1, 1, cfg.audio_out_dim, dtype=dtype, device=device))
    return image.float().sum() + video.float().sum() + sound.float().sum()


# ---------------------------------------------------------------------------- schedule
class CosineWithWarmup:
    """LR factor of optimizer update k (0-based): linear warm-up over `warmup` updates that
    starts at 1/(warmup+1) (no update is wasted at lr 0), then cosine from 1 to 0 over the
    rest. A class so LambdaLR checkpoints its settings."""

    def __init__(self, total: int, warmup: int):
        self.total = total
        self.warmup = warmup

    def __call__(self, k: int) -> float:
        if k < self.warmup:
            return (k + 1) / (self.warmup + 1)
        progress = (k - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps(total: int, ratio: float) -> int:
    return math.ceil(total * ratio)


# ---------------------------------------------------------------------------- optimizer
def param_groups(trainable: dict, weight_decay: float) -> list[dict]:
    """Biases and norm weights (1-D) are not decayed, as in the HF Trainer the release used."""
    decay = [p for p in trainable.values() if p.ndim >= 2]
    no_decay = [p for p in trainable.values() if p.ndim < 2]
    if weight_decay == 0:
        return [{"params": decay + no_decay, "weight_decay": 0.0}]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def make_optimizer(groups: list[dict], cfg: TrainConfig, device: torch.device):
    kw = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam
            return FusedAdam(groups, adam_w_mode=True, **kw), "apex FusedAdam (AdamW mode)"
        except ImportError:
            return torch.optim.AdamW(groups, fused=True, **kw), "torch AdamW (fused)"
    return torch.optim.AdamW(groups, foreach=True, **kw), "torch AdamW (foreach, CPU)"


# ---------------------------------------------------------------------------- deepspeed config
def deepspeed_config(cfg: TrainConfig, bf16: bool, cuda: bool) -> dict:
    zero = {"stage": cfg.zero_stage, "contiguous_gradients": True,
            "reduce_bucket_size": int(5e8), "allgather_bucket_size": int(5e8),
            "reduce_scatter": True, "overlap_comm": cuda}
    return {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # Our AdamW is an ordinary torch optimizer; ZeRO runs it on its flat partitions.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def check_user_deepspeed_config(path: str) -> dict:
    from fastground.train.cli import ConfigError
    try:
        with open(path, encoding="utf-8") as f:
            user = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--deepspeed-config {path}: cannot read JSON ({e})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"--deepspeed-config {path}: expected a JSON object")
    stage = user.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, "auto"):
        raise ConfigError(f"--deepspeed-config {path}: ZeRO stage {stage} is not supported here "
                          "(parameters must stay whole on every rank for the export); the paper uses 2")
    if user.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"--deepspeed-config {path}: fp16 is not supported (the paper trains in bf16)")
    return user


def merge_deepspeed_config(user: dict, ours: dict, path: str) -> dict:
    """The user's JSON wins, except that "auto" and missing fields take our values and batch
    sizes must agree with the ones this run uses (the data loader is built from ours)."""
    from fastground.train.cli import ConfigError

    def fill(u, o):
        out = dict(u)
        for k, v in o.items():
            if k not in out or out[k] == "auto":
                out[k] = v
            elif isinstance(v, dict) and isinstance(out[k], dict):
                out[k] = fill(out[k], v)
        return out

    merged = fill(user, ours)
    for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if merged[k] != ours[k]:
            raise ConfigError(f"--deepspeed-config {path}: {k}={merged[k]} disagrees with this run's "
                              f"{ours[k]}; set the batch with --global-batch/--micro-batch or use \"auto\"")
    return merged


# ---------------------------------------------------------------------------- model
def _has_tokenizer(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "tokenizer_config.json"))


def build_model(cfg: TrainConfig, tokenizer, bf16: bool):
    """(model, description of the starting weights)."""
    from fastground import GroundingGPT, GroundingGPTConfig

    start = cfg.starting_point()
    dtype = torch.bfloat16 if bf16 else None
    if start is None:
        preset = cfg.preset or "tiny"
        mcfg = GroundingGPTConfig.from_preset(preset)
        mcfg.set_token_ids(tokenizer)
        torch.manual_seed(cfg.seed)
        model = GroundingGPT(mcfg)
        if dtype is not None:
            model.to(dtype)
        return model, f"initial weights of the {preset!r} preset (seed {cfg.seed})"
    with open(os.path.join(start, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    if model_type == "llama":
        from fastground.train.vicuna import build_from_vicuna
        return build_from_vicuna(cfg, tokenizer, dtype), f"Vicuna weights {start} with fresh adapters"
    model = GroundingGPT.from_pretrained(start, vision_tower_path=cfg.vision_tower, eva_path=cfg.eva,
                                         qformer_path=cfg.qformer, imagebind_path=cfg.imagebind, dtype=dtype)
    check_token_ids(model.config, tokenizer, start)
    what = "the previous stage's output" if cfg.model is None else "--model"
    return model, f"{what} {start}"


def check_token_ids(mcfg, tokenizer, where: str) -> None:
    probe = mcfg.replace()
    probe.set_token_ids(tokenizer)
    for modality in ("image", "video", "sound"):
        if probe.token_ids(modality) != mcfg.token_ids(modality):
            raise ValueError(f"{where}: the tokenizer's {modality} token ids {probe.token_ids(modality)} differ "
                             f"from the checkpoint's {mcfg.token_ids(modality)}; use the tokenizer saved with it")
    if len(tokenizer) > mcfg.vocab_size:
        raise ValueError(f"{where}: the tokenizer has {len(tokenizer)} tokens, the model's vocabulary {mcfg.vocab_size}")


def add_lora(model, cfg: TrainConfig) -> None:
    from peft import LoraConfig, inject_adapter_in_model
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)")
    inject_adapter_in_model(lcfg, model)


def trainable_set(model, stage: int, lora: bool) -> dict:
    from fastground.model.stages import LLM_PREFIXES, set_stage
    trainable = set_stage(model, stage)
    if lora:
        for n in list(trainable):
            if n.startswith(LLM_PREFIXES) and "lora_" not in n:
                trainable.pop(n).requires_grad_(False)
    return trainable


# ---------------------------------------------------------------------------- the run
@dataclass
class TrainResult:
    output: str
    steps: int  # optimizer steps done in total (including those before a resume)
    losses: list = field(default_factory=list)  # (step, loss) of the steps this call ran
    final: str | None = None
    checkpoint: str | None = None
    seconds: float = 0.0


def _setup_logging(rank: int) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                            stream=sys.stderr)
    level = logging.INFO if rank == 0 else logging.WARNING
    for name in ("fastground", "fastground.train"):
        logging.getLogger(name).setLevel(level)
    # DeepSpeed logs every config key at INFO on every rank.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)
    except ImportError:
        pass


def _precision(cfg: TrainConfig, device: torch.device) -> bool:
    """True for bf16."""
    if cfg.precision == "fp32":
        return False
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if cfg.precision == "bf16":
        if not supported:
            log.warning("bf16 requested on %s, which has no fast bf16: expect a slow run", device)
        return True
    if not supported:
        log.info("precision: fp32 on %s (the paper's bf16 only where the device supports it)", device)
        return False
    log.info("precision: bf16 weights and activations, fp32 master weights (as the paper)")
    return True


def train(cfg: TrainConfig) -> TrainResult:
    # A process group made here lives as long as the process: DeepSpeed caches its groups
    # in module globals, so a second run in the same process (tests, notebooks) reuses it.
    return _train(cfg, setup_distributed())


@dataclass
class Run:
    """Everything one training run holds between steps (built once by `build_run`)."""
    cfg: TrainConfig
    info: DistInfo
    engine: object  # deepspeed.DeepSpeedEngine
    tokenizer: object
    td: object  # fastground.train.data.TrainData
    loader: object
    batches: object  # iterator over the loader
    metrics: object  # fastground.train.metrics.Metrics
    settings: dict
    source: str
    total: int
    stop: int
    bf16: bool
    step: int = 0
    counters: dict = field(default_factory=lambda: {"tokens": 0, "samples": 0, "skipped": 0})
    t_start: float = 0.0

    @property
    def output(self) -> str:
        return self.cfg.output_dir()


@dataclass
class StepStats:
    """What one optimizer step did, summed over every rank."""
    loss: float  # mean over the answer tokens of the global batch
    lr: float
    seconds: float
    tokens: int  # tokens through the LLM
    samples: int
    answer_tokens: int
    skipped: int
    grad_norm: float | None
    computed_tokens: int = 0  # tokens the LLM computed, padding included
    micro_batches: int = 0

    @property
    def padding_waste(self) -> float:
        """Computed / real tokens (1.0: no padding)."""
        return self.computed_tokens / max(self.tokens, 1)


def _prepare_output(cfg: TrainConfig, rank: int) -> str:
    from fastground.train import checkpoint as ckpt
    output = cfg.output_dir()
    if rank == 0:
        os.makedirs(output, exist_ok=True)
    from fastground.train import output_dir
    output_dir.begin_run(output)  # the run id of this run's metrics lines
    if cfg.resume is None and rank == 0:
        # Removed only once this run has written its first checkpoint (output_dir's rules).
        output_dir.note_earlier_run(output, [p for _, p in ckpt.list_checkpoints(output)])
    return output


def _data_files(cfg: TrainConfig, info: DistInfo):
    """(data, previous-stage data, media folders, tokenizer directory); the demo set is
    generated once, by one process per machine, when no data or tokenizer is given."""
    from fastground.train.data import demo_paths
    folders = {"image": cfg.image_folder, "video": cfg.video_folder, "sound": cfg.sound_folder}
    data, prev_data, tok_dir = cfg.data, cfg.prev_data, cfg.tokenizer
    start = cfg.starting_point()
    if tok_dir is None and _has_tokenizer(start):
        tok_dir = start
    if data is None or tok_dir is None:
        # The demo set also provides the tiny preset's tokenizer (<= 512 ids).
        from fastground.data.demo import ensure_demo_data
        if start is not None and tok_dir is None:
            raise ValueError(f"{start} has no tokenizer; give --tokenizer")
        if info.local_rank == 0:
            ensure_demo_data(cfg.demo_data)
        _barrier()
        demo = demo_paths(cfg.demo_data, cfg.stage)
        tok_dir = tok_dir or demo["tokenizer"]
        if data is None:
            data = demo["data"]
            if prev_data is None and cfg.alpha > 0:
                prev_data = demo["prev_data"]
            folders = {m: folders[m] or demo[m] for m in folders}
    return data, prev_data, folders, tok_dir


def _make_engine(cfg: TrainConfig, model, trainable: dict, total: int, warm: int, bf16: bool, info: DistInfo):
    import deepspeed
    device = info.device
    ds_cfg = deepspeed_config(cfg, bf16, device.type == "cuda")
    user = None
    if cfg.deepspeed_config:
        user = check_user_deepspeed_config(cfg.deepspeed_config)
        ds_cfg = merge_deepspeed_config(user, ds_cfg, cfg.deepspeed_config)
    optimizer, opt_name = (None, "from --deepspeed-config")
    if "optimizer" not in (user or {}):
        optimizer, opt_name = make_optimizer(param_groups(trainable, cfg.weight_decay), cfg, device)
    schedule = CosineWithWarmup(total, warm)
    scheduler = None
    if "scheduler" not in (user or {}):
        def scheduler(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           model_parameters=None if optimizer is not None else list(trainable.values()),
                                           config=ds_cfg, dist_init_required=False)
    log.info("engine: DeepSpeed ZeRO-%d, %s, %s, %d process(es)", ds_cfg["zero_optimization"]["stage"],
             opt_name, "bf16" if bf16 else "fp32", info.world_size)
    return engine


def _resume_or_seed(cfg: TrainConfig, engine, td, output: str, info: DistInfo, total: int,
                    counters: dict) -> int:
    """The step to start at: a checkpoint's (restoring its state and RNG), else 0 with the
    run's seeds set."""
    from fastground.train import checkpoint as ckpt
    rank, world, device = info.rank, info.world_size, info.device
    resume_path = None
    if cfg.resume is not None:
        resume_path = ckpt.find_resume_checkpoint(cfg.resume, output)
        if resume_path is None:
            log.warning("--resume: no checkpoint in %s, starting at step 0", output)
    if resume_path is None:
        random.seed(cfg.seed + rank)
        np.random.seed((cfg.seed + rank) % 2**32)
        torch.manual_seed(cfg.seed + rank)  # dropout differs per rank, as in a DDP run
        return 0
    state = ckpt.load_checkpoint(engine, resume_path)
    _check_resumable(state, cfg, world, total, resume_path)
    step = int(state["step"])
    counters.update(state.get("counters", {}))
    td.sampler.load_state_dict(state["sampler"])  # rejects a changed data set / seed / world size
    if td.batches.sampler_state(step) != state["sampler"]:
        raise ResumeError(f"{resume_path}: the data stream differs from the saved run's")
    log.info("resumed from %s at step %d", resume_path, step)
    ckpt.restore_rng(resume_path, rank, device)
    return step


def build_run(cfg: TrainConfig, info: DistInfo) -> Run:
    """Output folder, data, model, DeepSpeed engine, resume state, loader and metrics."""
    from fastground.train import guards
    from fastground.train import fast_engine
    from fastground.train.data import build_train_data
    from fastground.train.metrics import Metrics, path_params, peak_flops

    t_start = time.perf_counter()
    rank, world, device = info.rank, info.world_size, info.device
    _setup_logging(rank)
    output = _prepare_output(cfg, rank)
    bf16 = _precision(cfg, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32

    data, prev_data, folders, tok_dir = _data_files(cfg, info)
    tokenizer = load_tokenizer(tok_dir)

    model, source = build_model(cfg, tokenizer, bf16)
    log.info("stage %d starts from %s", cfg.stage, source)
    template, why = training_template(cfg.template, model.config.conversation_template)
    model.config.conversation_template = template.name  # recorded in every checkpoint's config
    cfg = dataclasses.replace(cfg, template=template.name)
    log.info("conversation template: %s (%s); loss: %s mean", template.name, why, cfg.loss_reduction)
    if cfg.max_length > model.config.max_position_embeddings:
        log.info("max length %d > the model's %d positions: using %d", cfg.max_length,
                 model.config.max_position_embeddings, model.config.max_position_embeddings)
        cfg = dataclasses.replace(cfg, max_length=model.config.max_position_embeddings)
    if device.type == "cpu":
        threads = cpu_threads(cfg, model.config.hidden_size)
        torch.set_num_threads(threads)
        log.info("CPU: %d torch thread(s) per process (--cpu-threads)", threads)
    if cfg.lora:
        add_lora(model, cfg)
    trainable = trainable_set(model, cfg.stage, cfg.lora)
    cfg = fast_engine.apply_fast_path(cfg, model, device)
    from fastground import features
    cache = features.attach(cfg, model, data, prev_data, folders, info)  # --feature-cache
    if cache:
        cache.detach_encoders(model, output, rank)
    cfg = dataclasses.replace(cfg, packed=check_packing(cfg.loss_reduction, cfg.packed))
    packed, max_tokens = fast_engine.packing(cfg, model)
    cfg = dataclasses.replace(cfg, packed=packed, max_tokens=max_tokens)
    cfg = dataclasses.replace(cfg, checkpointing=fast_engine.apply_checkpointing(cfg, model, trainable, bf16,
                                                                                 world, device))
    n_train = sum(p.numel() for p in trainable.values())
    n_all = sum(p.numel() for p in model.parameters()) + (cache.detached(model) if cache else 0)
    log.info("trainable: %s of %s parameters (%d tensors)%s", f"{n_train:,}", f"{n_all:,}", len(trainable),
             " with LoRA on the LLM" if cfg.lora else "")

    td = build_train_data(data, prev_data, cfg.alpha, tokenizer, model.config, folders, cfg.max_length,
                          cfg.video_backend, cfg.max_bad_fraction, cfg.seed, rank, world,
                          cfg.micro_batch, cfg.grad_accum, media_loaders=cache and cache.loaders)
    total = cfg.max_steps if cfg.max_steps is not None else td.batches.steps_for_epochs(cfg.epochs)
    warm = warmup_steps(total, cfg.warmup_ratio)
    if cache:
        cache.note_epochs(total, td.batches.steps_in_epoch(0))
    log.info("data: %d samples%s; %d steps of %d samples (%d per process x %d accumulation x %d processes), "
             "warm-up %d steps", td.n_current,
             f" + {td.n_previous} replayed at alpha={cfg.alpha}" if td.n_previous else "",
             total, cfg.global_batch, cfg.micro_batch, cfg.grad_accum, world, warm)

    engine = _make_engine(cfg, model, trainable, total, warm, bf16, info)
    counters = {"tokens": 0, "samples": 0, "skipped": 0}
    step = _resume_or_seed(cfg, engine, td, output, info, total, counters)

    stop = total if cfg.stop_after is None else min(total, cfg.stop_after)
    num_workers = cfg.num_workers if cfg.num_workers is not None else (4 if device.type == "cuda" else 0)
    loader = td.loader(step, num_workers, cfg.packed, cfg.max_length, cfg.seed, device.type == "cuda",
                       cfg.max_tokens)
    metrics = Metrics(output, total, step, rank, world, device, path_params(engine.module, trainable),
                      peak_flops(device, cfg.peak_tflops), cfg.tensorboard, cfg.progress, cfg.log_every)
    settings = dict(cfg.to_dict(), world_size=world, precision="bf16" if bf16 else "fp32",
                    total_steps=total, warmup_steps=warm, started_from=source,
                    fingerprint=guards.fingerprint(cfg))
    return Run(cfg=cfg, info=info, engine=engine, tokenizer=tokenizer, td=td, loader=loader,
               batches=iter(loader), metrics=metrics, settings=settings, source=source, total=total,
               stop=stop, bf16=bf16, step=step, counters=counters, t_start=t_start)


def next_micro_batches(run: Run) -> list[dict]:
    """The micro-batches of this rank for the next optimizer step: --grad-accum padded ones,
    or as many packed ones as the step's samples fill."""
    if run.cfg.packed:
        return next(run.batches)
    return [next(run.batches) for _ in range(run.cfg.grad_accum)]


def train_step(run: Run, micro: list[dict]) -> StepStats:
    """One optimizer step over this rank's micro-batches: forward, backward, update.

    Host syncs: two all-reduces of a few integers up front (token counts, micro-batch count)
    and the loss and gradient norm at the end; none per micro-batch (the collate counted the
    answer tokens and checked the media blocks on the CPU)."""
    from fastground.train.data import empty_batch
    engine, device, world = run.engine, run.info.device, run.info.world_size
    t0 = time.perf_counter()
    lr = engine.get_lr()[0]
    local = [0.0, 0.0, 0.0, 0.0, 0.0]  # answer tokens, real LLM tokens, samples, skipped, computed tokens
    for b in micro:
        local[0] += b["n_answer"]
        local[1] += b.pop("_tokens")
        local[2] += b.pop("_samples")
        local[3] += b.pop("_skipped")
        local[4] += b.pop("_computed")
    answer_tokens, tokens, samples, skipped, computed = _all_reduce_sum(local, device)
    # Packed steps hold a varying number of micro-batches; ZeRO-2 reduces gradients in every
    # backward, so every rank runs as many (the short ones add empty micro-batches).
    n_micro = _all_reduce_max(len(micro), device) if run.cfg.packed else len(micro)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for k in range(n_micro):
        b = micro[k] if k < len(micro) else empty_batch(run.td.pad_token_id)
        b = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
        engine.set_gradient_accumulation_boundary(k == n_micro - 1)
        anchor = branch_anchor(engine.module)
        out = engine(**b)
        # out.loss is the micro-batch's mean, connected to every LLM tensor even without answers
        token_loss = out.loss.float() * out.n_tokens
        # --loss-reduction: this micro-batch's share of the step loss (train/loss_reduction.py)
        weight = micro_batch_weight(run.cfg.loss_reduction, out.n_tokens, answer_tokens, world, n_micro)
        engine.backward(token_loss * weight + 0.0 * anchor, scale_wrt_gas=False)
        engine.step()
        loss_sum += token_loss.detach().double() * weight
    loss = step_loss(_all_reduce_sum([loss_sum.item()], device)[0], world)
    gn = engine.get_global_grad_norm()
    gn = float(gn) if gn is not None and math.isfinite(float(gn)) else None
    return StepStats(loss=loss, lr=lr, seconds=time.perf_counter() - t0, tokens=int(tokens), samples=int(samples),
                     answer_tokens=int(answer_tokens), skipped=int(skipped), grad_norm=gn,
                     computed_tokens=int(computed), micro_batches=n_micro)


def _save(run: Run) -> str:
    from fastground.train import checkpoint as ckpt
    cfg, world = run.cfg, run.info.world_size
    state = dict(step=run.step, sampler=run.td.batches.sampler_state(run.step), counters=run.counters,
                 world_size=world, global_batch=cfg.global_batch, micro_batch=cfg.micro_batch,
                 grad_accum=cfg.grad_accum, stage=cfg.stage, seed=cfg.seed, total_steps=run.total,
                 lora=cfg.lora, settings=run.settings)
    return ckpt.save_checkpoint(run.engine, run.output, run.step, state, cfg.keep_last, run.info.rank, run.info.device)


def _finish(run: Run, result: TrainResult) -> TrainResult:
    from fastground.train import checkpoint as ckpt
    rank, step, total = run.info.rank, run.step, run.total
    result.steps = step
    if run.counters["skipped"]:
        log.warning("%d samples could not be loaded and were skipped (see the warnings above)", run.counters["skipped"])
    if step < total:
        log.info("stopped after %d of %d steps (--stop-after); continue with --resume", step, total)
    else:
        if rank == 0:
            result.final = ckpt.export_final(run.engine.module, run.tokenizer, run.output, run.settings)
            log.info("final model: %s (GroundingGPT.from_pretrained loads it)", result.final)
        _barrier()
        result.final = os.path.join(run.output, "final")
    result.seconds = time.perf_counter() - run.t_start
    if rank == 0 and result.losses:
        log.info("done in %.1fs: loss %.4f at step %d -> %.4f at step %d", result.seconds,
                 result.losses[0][1], result.losses[0][0], result.losses[-1][1], result.losses[-1][0])
    return result


def _train(cfg: TrainConfig, info: DistInfo) -> TrainResult:
    run = build_run(cfg, info)
    cfg = run.cfg
    result = TrainResult(output=run.output, steps=run.step)
    run.engine.train()
    from fastground.train.guards import StopOnSignal, check_skip_fraction
    stop = StopOnSignal().__enter__()  # Ctrl-C / SIGTERM: finish the step, save, return
    try:
        while run.step < run.stop:
            s = train_step(run, next_micro_batches(run))
            run.step += 1
            run.counters["tokens"] += s.tokens
            run.counters["samples"] += s.samples
            run.counters["skipped"] += s.skipped
            run.metrics.step(run.step, s.loss, s.lr, s.seconds, s.tokens, s.samples, s.answer_tokens, s.skipped,
                             s.grad_norm, padding_waste=s.padding_waste, micro_batches=s.micro_batches)
            result.losses.append((run.step, s.loss))
            if not math.isfinite(s.loss):
                raise FloatingPointError(f"step {run.step}: loss is {s.loss}")
            check_skip_fraction(run)  # at each epoch's end: the whole run's skipped fraction
            interrupted = stop.requested(run.info.device)
            if (cfg.save_every and run.step % cfg.save_every == 0) or run.step == run.stop or interrupted:
                result.checkpoint = _save(run)
                run.metrics.note(f"step {run.step}: checkpoint {result.checkpoint}")
            if interrupted:
                log.warning("interrupted at step %d: checkpoint %s written; continue with --resume", run.step,
                            result.checkpoint)
                break
    finally:
        stop.__exit__(None, None, None)
        run.metrics.close()
        run.batches = run.loader = None
    return _finish(run, result)


class ResumeError(ValueError):
    """A checkpoint that cannot continue this run (other settings or data)."""


def _check_resumable(state: dict, cfg: TrainConfig, world: int, total: int, path: str) -> None:
    same = {"world_size": world, "global_batch": cfg.global_batch, "micro_batch": cfg.micro_batch,
            "grad_accum": cfg.grad_accum, "stage": cfg.stage, "seed": cfg.seed, "lora": cfg.lora,
            "total_steps": total}
    diff = {k: (state.get(k), v) for k, v in same.items() if state.get(k) != v}
    saved = state.get("settings", {})
    for k in ("template", "loss_reduction"):  # recorded in the settings since issue 15
        if k in saved and saved[k] != getattr(cfg, k):
            diff[k] = (saved[k], getattr(cfg, k))
    if diff:
        detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ResumeError(f"cannot resume from {path}: settings differ ({detail}); the continued run would "
                         "not match the interrupted one")
