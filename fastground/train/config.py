"""Training settings: one dataclass, Table 9 of the paper as the per-stage defaults.

Batch sizes. Table 9 lists "batch size" 64 / 16 / 8 with gradient accumulation 1 / 2 / 2 on
8 GPUs. Stage 3's 8 with accumulation 2 cannot be a global batch split over 8 GPUs, so the
numbers are per-GPU batch sizes, the HF Trainer's `per_device_train_batch_size` that the
release scripts set. Here they are `micro_batch`, and the global batch of the release run is
micro_batch x grad_accum x 8 = 512 / 256 / 128 samples per optimizer step. The global batch
is the setting that defines the optimisation: on another GPU count the accumulation changes
to keep it (1 GPU: 8 / 16 / 16 micro-batches per step), unless told otherwise.

The `tiny` preset (no --model, the demo data) has its own defaults sized for a few CPU
minutes; see TINY_DEFAULTS.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

from fastground.data.templates import TEMPLATES
from fastground.data.video import BACKENDS as VIDEO_BACKENDS
from fastground.train.loss_reduction import DEFAULT_LOSS_REDUCTION, LOSS_REDUCTIONS

RELEASE_GPUS = 8  # Table 9: 8 x A100

# Table 9 per stage; the global batch follows from the 8 GPUs of the paper.
RELEASE_DEFAULTS: dict[int, dict[str, Any]] = {
    1: dict(micro_batch=64, grad_accum=1, lr=1e-3),
    2: dict(micro_batch=16, grad_accum=2, lr=2e-5),
    3: dict(micro_batch=8, grad_accum=2, lr=2e-5),
}
for _d in RELEASE_DEFAULTS.values():
    _d["global_batch"] = _d["micro_batch"] * _d["grad_accum"] * RELEASE_GPUS

# The demo: the tiny preset (hidden 64, 2 layers) on the embedded demo data, a few CPU
# minutes per stage. Stage 3's structure (accumulation 2) at a small batch; learning rates
# are the release's scaled up for a model 64x narrower, which at 2e-5 learns far too slowly
# to see in a few hundred steps (2e-3 for adapters only, 1e-3 once the LLM trains too); 300
# steps, the same cosine schedule with 3% warm-up.
TINY_DEFAULTS: dict[int, dict[str, Any]] = {
    1: dict(micro_batch=4, grad_accum=1, global_batch=4, lr=2e-3, max_steps=300),
    2: dict(micro_batch=4, grad_accum=2, global_batch=8, lr=1e-3, max_steps=300),
    3: dict(micro_batch=4, grad_accum=2, global_batch=8, lr=1e-3, max_steps=300),
}
# Replay rate of the previous stage's data when --prev-data is given without --alpha. The
# paper names the mechanism (3.2.3) but not the value.
DEFAULT_ALPHA = 0.1
DEMO_DATA = os.path.join("runs", "demo_data")


def _opt(default: Any = None, help: str = "", **argparse_kwargs: Any):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    # --- what to train
    stage: int = _opt(3, "training stage: 1 multi-modal pre-training (adapters only), 2 fine-grained "
                         "alignment, 3 multi-granularity instruction tuning (LLM + adapters)",
                      choices=(1, 2, 3))
    preset: str | None = _opt(None, "model preset built when neither --model nor a previous stage's "
                                    "output exists (default tiny, the CPU demo model; groundinggpt-7b: an "
                                    "untrained 7B); with a Vicuna --model, the encoder and adapter sizes "
                                    "(default: the 7B's or 13B's, from the LLM's width)")
    model: str | None = _opt(None, "starting weights: a release-layout checkpoint (config.json with "
                                   "model_type LEGO), or a Vicuna (Llama) directory, which then needs "
                                   "--vision-tower --eva --qformer --imagebind. Default: "
                                   "<output>/../stage{N-1}/final when it exists, else a fresh --preset model")
    tokenizer: str | None = _opt(None, "tokenizer directory (default: the --model directory, the "
                                       "previous stage's final/, or the demo tokenizer)")
    vision_tower: str | None = _opt(None, "CLIP ViT-L/14-336 directory (transformers layout)")
    eva: str | None = _opt(None, "EVA ViT-g weights (eva_vit_g.pth)")
    qformer: str | None = _opt(None, "BLIP-2 checkpoint with the frame Q-Former (blip2_pretrained_flant5xxl.pth)")
    imagebind: str | None = _opt(None, "ImageBind-huge weights (imagebind_huge.pth)")
    lora: bool = _opt(False, "train LoRA adapters on the LLM instead of the full LLM (stages 2/3); "
                             "merged into the weights of the exported model")
    lora_r: int = _opt(128, "LoRA rank")
    lora_alpha: int = _opt(256, "LoRA alpha")
    lora_dropout: float = _opt(0.05, "LoRA dropout")

    template: str | None = _opt(None, "conversation template of the training text, recorded in the "
                                      "checkpoint's config for infer/evaluate/chat: lego (the release's: "
                                      "'### Human: ... ### Assistant: ...', role tags and '###' "
                                      "supervised, no EOS) or vicuna_v1 (' USER: ... ASSISTANT: ...</s>'). "
                                      "Default: the starting checkpoint's, else lego",
                                choices=tuple(TEMPLATES))

    # --- data
    data: str | None = _opt(None, "comma-separated LLaVA-style JSON files of this stage "
                                  "(default: the demo data's stage{N}.json, generated on first use)")
    image_folder: str | None = _opt(None, "folder the JSON's image paths are relative to")
    video_folder: str | None = _opt(None, "folder the JSON's video paths are relative to")
    sound_folder: str | None = _opt(None, "folder the JSON's sound paths are relative to")
    prev_data: str | None = _opt(None, "comma-separated JSON files of the previous stage, replayed at "
                                       "rate --alpha (same media folders); the demo replays its "
                                       "stage{N-1}.json in stages 2 and 3")
    alpha: float | None = _opt(None, "replay rate: the chance that a slot of the sample stream is a "
                                     f"previous-stage sample (default 0 in stage 1, {DEFAULT_ALPHA} "
                                     "when there is previous-stage data; the paper gives no value)")
    demo_data: str = _opt(DEMO_DATA, "where the demo data is generated and read when --data is not given")
    max_length: int = _opt(2048, "maximum tokens per sample (longer ones are truncated or skipped "
                                 "by the dataset)")
    packed: bool | None = _opt(None, "pack each step's samples into rows without padding, micro-batches "
                                     "filled up to --max-tokens (default: on wherever a varlen attention "
                                     "runs: FlashAttention-2 / torch varlen on GPU, SDPA on CPU); "
                                     "--no-packed: padded micro-batches of --micro-batch samples")
    max_tokens: int | None = _opt(None, "token budget of one packed micro-batch (default: micro batch x "
                                        "max length, the padded worst case)")
    num_workers: int | None = _opt(None, "DataLoader workers per process (default: 4 on GPU, 0 on CPU)")
    video_backend: str = _opt("pyav", "video decoder: pyav (reference: PIL bicubic of the decoded RGB), "
                                       "pyav-scale (crop, resize and RGB in one FFmpeg pass; faster, slightly different pixels), dali", choices=tuple(VIDEO_BACKENDS))
    feature_cache: str | None = _opt(None, "read the frozen encoders' outputs from this cache (made by "
                                           "python -m fastground.features) instead of decoding media and "
                                           "running EVA/CLIP/ImageBind; media it lacks are encoded first")
    cache_strict: bool = _opt(False, "with --feature-cache: refuse to start when the cache lacks any "
                                     "media of the data instead of encoding it")
    max_bad_fraction: float = _opt(0.05, "stop when more than this fraction of samples fail to load")

    # --- optimisation (Table 9)
    global_batch: int | None = _opt(None, "samples per optimizer step over all processes "
                                          "(default: micro batch x grad accum x 8, the paper's 8 GPUs: "
                                          "512 / 256 / 128; tiny demo: 4 / 8 / 8)")
    micro_batch: int | None = _opt(None, "samples per process per forward pass (Table 9 'batch "
                                         "size': 64 / 16 / 8; tiny demo: 4)")
    grad_accum: int | None = _opt(None, "micro-batches per optimizer step (default: global batch / "
                                        "(world size x micro batch); Table 9: 1 / 2 / 2 on 8 GPUs)")
    lr: float | None = _opt(None, "peak learning rate (Table 9: 1e-3 / 2e-5 / 2e-5; tiny demo: "
                                  "2e-3 / 1e-3 / 1e-3)")
    warmup_ratio: float = _opt(0.03, "fraction of the steps spent warming the learning rate up linearly")
    weight_decay: float = _opt(0.0, "AdamW weight decay (biases and norm weights are never decayed)")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.999, "AdamW beta2")
    adam_eps: float = _opt(1e-8, "AdamW epsilon")
    max_grad_norm: float = _opt(1.0, "clip the global gradient norm to this (0: no clipping)")
    epochs: int = _opt(1, "passes over this stage's data (ignored when --max-steps is given)")
    max_steps: int | None = _opt(None, "optimizer steps of the whole run; sets the schedule's length "
                                       "(overrides --epochs)")
    stop_after: int | None = _opt(None, "stop (after a checkpoint) once this many steps are done, "
                                        "keeping the schedule of the whole run: for time-limited jobs, "
                                        "continued with --resume")
    precision: str = _opt("auto", "auto: bf16 where the GPU supports it (as the paper), else fp32 "
                                  "(CPU); bf16 keeps fp32 master weights in the optimizer",
                          choices=("auto", "bf16", "fp32"))
    tf32: bool = _opt(True, "allow TF32 matmuls on Ampere+ GPUs (as the paper)")
    gradient_checkpointing: bool | None = _opt(None, "same as --checkpointing full / none (kept for "
                                                     "older configs)")
    checkpointing: str | None = _opt(None, "activation checkpointing of the LLM layers: full (recompute "
                                           "each layer), selective (keep matmul outputs, recompute norms, "
                                           "activations and RoPE), none (default: the least recomputation "
                                           "whose memory estimate fits the device; the log prints it)",
                                     choices=("full", "selective", "none"))
    fast_path: bool | None = _opt(None, "run the Triton-fused Q-Formers (the frozen frame Q-Former "
                                        "too), adapters and projections (default: on where Triton runs: a "
                                        "CUDA device or TRITON_INTERPRET=1)")
    fused_llama: bool | None = _opt(None, "fused RMSNorm, RoPE and SwiGLU kernels in the LLM layers "
                                          "(default: with --fast-path)")
    fused_loss: bool = _opt(True, "answer-only chunked linear cross-entropy: lm_head only on answer "
                                  "positions, never a tokens x vocab tensor (--no-fused-loss: logits of "
                                  "every position, then cross-entropy)")
    cpu_threads: int | None = _opt(None, "torch threads per process on CPU (default: OMP_NUM_THREADS if "
                                         "set, else 1 for models narrower than 512, else the cores / "
                                         "local processes)")
    zero_stage: int = _opt(2, "DeepSpeed ZeRO stage (the paper: 2)", choices=(0, 1, 2))
    deepspeed_config: str | None = _opt(None, "your own DeepSpeed JSON; \"auto\" values and missing "
                                              "batch fields are filled from these settings, an "
                                              "\"optimizer\"/\"scheduler\" section replaces ours")
    seed: int = _opt(42, "seed of the initial weights, data order, augmentation and dropout")
    loss_reduction: str = _opt(DEFAULT_LOSS_REDUCTION, "token: the step's loss is the mean over every "
                                                       "supervised token of the global batch; release: "
                                                       "the mean of the micro-batch means over micro-batches "
                                                       "and ranks, as the release's trainer (padded "
                                                       "micro-batches)", choices=LOSS_REDUCTIONS)

    # --- output
    output: str | None = _opt(None, "run directory: checkpoints, metrics, final/ (default: runs/stage{N})")
    save_every: int = _opt(500, "save a resumable checkpoint every N steps (0: only at the end)")
    keep_last: int = _opt(2, "checkpoints kept (older ones are deleted)")
    resume: str | None = _opt(None, "continue from a checkpoint: its directory, or with no value the "
                                    "newest one in --output", nargs="?", const="latest")
    log_every: int = _opt(1, "write metrics every N steps")
    tensorboard: bool = _opt(True, "also write metrics to TensorBoard (<output>/tensorboard)")
    progress: bool | None = _opt(None, "show a progress bar (default: when stderr is a terminal; "
                                       "otherwise a log line every 30 s)")
    peak_tflops: float | None = _opt(None, "peak dense TFLOP/s of one accelerator for the MFU figure "
                                           "(default: looked up from the GPU name)")

    # ------------------------------------------------------------------ derived settings
    def output_dir(self) -> str:
        return self.output or os.path.join("runs", f"stage{self.stage}")

    def previous_stage_final(self) -> str | None:
        """Where the previous stage's run (default layout: runs/stage{N-1}) left its model."""
        if self.stage == 1:
            return None
        return os.path.join(os.path.dirname(os.path.abspath(self.output_dir())), f"stage{self.stage - 1}", "final")

    def starting_point(self) -> str | None:
        """The weights this run starts from: --model, else the previous stage's final/ when
        it exists, else None (a fresh --preset model)."""
        if self.model is not None:
            return self.model
        prev = self.previous_stage_final()
        if prev and os.path.isfile(os.path.join(prev, "config.json")):
            return prev
        return None

    def model_preset(self) -> str:
        """Preset of the starting weights: a fastground checkpoint records it, a release
        checkpoint or Vicuna directory is a full-size model."""
        start = self.starting_point()
        if start is None:
            return self.preset or "tiny"
        try:
            with open(os.path.join(start, "config.json")) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError):
            return "groundinggpt-7b"
        return d.get("fastground", {}).get("preset", "groundinggpt-7b")

    def resolve(self, world_size: int) -> "TrainConfig":
        """Fill what was left to the stage defaults; raises ValueError on inconsistent batch sizes."""
        tiny = self.model_preset() == "tiny"
        d = (TINY_DEFAULTS if tiny else RELEASE_DEFAULTS)[self.stage]
        c = dataclasses.replace(self)
        if c.lr is None:
            c.lr = d["lr"]
        if c.max_steps is None and "max_steps" in d and c.epochs == 1:
            c.max_steps = d["max_steps"]
        if c.checkpointing is None and c.gradient_checkpointing is not None:
            c.checkpointing = "full" if c.gradient_checkpointing else "none"
        c.global_batch, c.micro_batch, c.grad_accum = batch_sizes(
            self.global_batch, self.micro_batch, self.grad_accum, world_size, d)
        if c.alpha is None:
            c.alpha = DEFAULT_ALPHA if (c.prev_data or (c.data is None and c.stage > 1)) else 0.0
        return c

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def batch_sizes(global_batch: int | None, micro_batch: int | None, grad_accum: int | None,
                world_size: int, defaults: dict) -> tuple[int, int, int]:
    """(global, micro, accum) with global = micro x accum x world_size. What is given wins;
    otherwise the global batch is kept (it defines the optimisation) and the accumulation
    absorbs the world size."""
    for name, v in (("global batch", global_batch), ("micro batch", micro_batch), ("grad accum", grad_accum)):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    g, m, a = global_batch, micro_batch, grad_accum
    if g is None and m is not None and a is not None:
        return m * a * world_size, m, a
    if g is None:
        g = defaults["global_batch"]
    if m is None and a is None:
        m = defaults["micro_batch"]
        # A default micro batch too big for this world size's share shrinks to a divisor.
        while m > 1 and g % (m * world_size):
            m -= 1
    elif m is None:
        if g % (a * world_size):
            raise ValueError(f"global batch {g} is not divisible by world size {world_size} x grad accum "
                             f"{a} = {world_size * a}")
        m = g // (a * world_size)
    if g % (m * world_size):
        raise ValueError(f"global batch {g} is not divisible by world size {world_size} x micro batch "
                         f"{m} = {world_size * m}")
    accum = g // (m * world_size)
    if a is not None and a != accum:
        raise ValueError(f"global batch {g} != micro batch {m} x grad accum {a} x world size "
                         f"{world_size}; give two of the three")
    return g, m, accum


# ---------------------------------------------------------------------------- config files
def load_config_file(path: str) -> dict[str, Any]:
    """YAML or JSON mapping of option names (dashes or underscores) to values."""
    if not os.path.isfile(path):
        raise ValueError(f"--config: file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            values = json.loads(text)
        else:
            import yaml
            values = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError
        raise ValueError(f"--config {path}: cannot parse ({type(e).__name__}: {e})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of option: value, got a {type(values).__name__}")
    known = {f.name: f for f in fields(TrainConfig)}
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(f"--config {path}: unknown option {key!r}")
        out[name] = value
    return out


def check_types(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Config files bypass argparse's conversions: convert what is unambiguous (YAML reads
    `3e-4` as a string) and reject the rest with the option's name."""
    known = {f.name: f for f in fields(TrainConfig)}
    out = dict(values)
    for name, value in values.items():
        if value is None:
            continue
        ftype = str(known[name].type)
        if ftype.startswith(("int", "float")) and isinstance(value, str):
            try:
                value = int(value) if ftype.startswith("int") else float(value)
            except ValueError:
                pass
        if ftype.startswith("float") and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if ftype.startswith("bool") and not isinstance(value, bool):
            raise ValueError(f"{source}: {name} must be true or false, got {value!r}")
        if ftype.startswith("int") and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{source}: {name} must be an integer, got {value!r}")
        if ftype.startswith("float") and (isinstance(value, bool) or not isinstance(value, float)):
            raise ValueError(f"{source}: {name} must be a number, got {value!r}")
        if ftype.startswith("str") and not isinstance(value, str):
            raise ValueError(f"{source}: {name} must be a string, got {value!r}")
        choices = known[name].metadata.get("choices")
        if choices and value not in choices:
            raise ValueError(f"{source}: {name} must be one of {', '.join(map(str, choices))}, got {value!r}")
        out[name] = value
    return out
