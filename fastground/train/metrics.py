"""Per-step training metrics: a tqdm bar, a JSONL file and TensorBoard (rank 0 only).

Model FLOPs utilisation (GPU only), the usual 6N estimate:
    mfu = 6 * N * tokens / step_time / (world_size * peak_flops)
N counts the parameters every LLM token goes through in forward and backward: the
decoder layers, the final norm and lm_head (not embed_tokens, a lookup), plus the trainable
adapters. tokens are the non-padding tokens entering the LLM over all ranks. Left out:
attention's sequence-dependent FLOPs, the frozen encoders' forward passes (which are real
work, so the figure understates the hardware's use on media-heavy batches), and
recomputation under gradient checkpointing. In stage 1 the frozen LLM needs no weight
gradients, so 6N overstates its backward by a third there. peak_flops is the dense bf16
tensor-core peak of one device: --peak-tflops, or looked up from the GPU name.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import deque

import torch

log = logging.getLogger("fastground.train")

# Dense (no sparsity) bf16 tensor-core TFLOP/s from the vendors' data sheets.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4), ("GH200", 989.4),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0),
)


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    log.info("no peak FLOP/s known for %r: MFU is not reported (give --peak-tflops)", name)
    return None


def mfu(flops_per_token: float, tokens: float, seconds: float, devices: int, peak: float) -> float:
    """Model FLOPs utilisation, the one definition the trainer and bench/ share: useful model
    FLOPs (flops_per_token x real tokens, see the module docstring) per second over the
    devices' datasheet peak."""
    return flops_per_token * tokens / seconds / (devices * peak)


class _NONE:
    name = role = None


def path_params(model: torch.nn.Module, trainable: dict) -> int:
    """N of the 6N estimate (see the module docstring)."""
    from fastground.model.branches import PER_TOKEN_LLM, part_of
    llm = sum(p.numel() for n, p in model.named_parameters()
              if (part_of(n) or _NONE).name in PER_TOKEN_LLM and "lora_" not in n)
    adapters = sum(p.numel() for n, p in trainable.items() if (part_of(n) or _NONE).role != "llm")
    lora = sum(p.numel() for n, p in trainable.items() if "lora_" in n)
    return llm + adapters + lora


class Metrics:
    def __init__(self, output: str, total_steps: int, start_step: int, rank: int, world_size: int,
                 device: torch.device, n_path_params: int, peak: float | None, tensorboard: bool,
                 progress: bool | None, log_every: int):
        self.active = rank == 0
        self.total = total_steps
        self.world_size = world_size
        self.device = device
        self.flops_per_token = 6 * n_path_params
        self.peak = peak
        self.log_every = log_every
        self.recent = deque(maxlen=20)
        self.file = None
        self.writer = None
        self.bar = None
        self.last_text_log = time.perf_counter()
        if not self.active:
            return
        os.makedirs(output, exist_ok=True)
        path = os.path.join(output, "metrics.jsonl")
        # Appended, never rewritten: every line names its run; read_metrics picks a run's lines.
        from fastground.train.output_dir import run_id
        self.run_id = run_id()
        self.file = open(path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(output, "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                log.info("tensorboard is not installed: metrics go to %s only", path)
        if progress or (progress is None and sys.stderr.isatty()):
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            desc="train")

    def step(self, step: int, loss: float, lr: float, step_time: float, tokens: int, samples: int,
             answer_tokens: int, skipped: int, grad_norm: float | None, padding_waste: float | None = None,
             micro_batches: int | None = None) -> dict | None:
        """padding_waste: tokens the LLM computed / real tokens (1.0 when packed)."""
        if not self.active:
            return None
        self.recent.append(step_time)
        avg = sum(self.recent) / len(self.recent)
        rec = {"run": self.run_id, "step": step, "loss": loss, "lr": lr, "step_time_s": step_time,
               "tokens_per_s": tokens / step_time, "samples_per_s": samples / step_time,
               "tokens": tokens, "answer_tokens": answer_tokens, "samples": samples,
               "eta_s": avg * (self.total - step)}
        if grad_norm is not None:
            rec["grad_norm"] = grad_norm
        if padding_waste is not None:
            rec["padding_waste"] = padding_waste
        if micro_batches is not None:
            rec["micro_batches"] = micro_batches
        if skipped:
            rec["skipped_samples"] = skipped
        if self.device.type == "cuda":
            rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
            if self.peak:
                rec["mfu"] = mfu(self.flops_per_token, tokens, step_time, self.world_size, self.peak)
        if step % self.log_every == 0 or step == self.total:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
            if self.writer is not None:
                for k, v in rec.items():
                    if k != "step" and isinstance(v, (int, float)):  # not the run id
                        self.writer.add_scalar(f"train/{k}", v, step)
        if self.bar is not None:
            post = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{rec['tokens_per_s']:.0f}",
                    "samp/s": f"{rec['samples_per_s']:.1f}", "step": f"{step_time:.2f}s"}
            if padding_waste is not None:
                post["pad"] = f"x{padding_waste:.2f}"
            if "peak_mem_gib" in rec:
                post["mem"] = f"{rec['peak_mem_gib']:.1f}G"
            if "mfu" in rec:
                post["mfu"] = f"{rec['mfu']:.1%}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        elif time.perf_counter() - self.last_text_log > 30 or step == self.total:
            self.last_text_log = time.perf_counter()
            log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s %.1f samples/s %.2fs/step padding x%.2f eta %.0fs",
                     step, self.total, loss, lr, rec["tokens_per_s"], rec["samples_per_s"], step_time,
                     padding_waste or 1.0, rec["eta_s"])
        return rec

    def note(self, text: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            log.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()


def read_metrics(output: str) -> list[dict]:
    """The records of the newest run in `output`, continued runs included: the newest run's
    lines, preceded by the newest record of each earlier step it resumed after."""
    path = os.path.join(output, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        records = []
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:  # a line cut by a kill mid-write
                continue
    if not records:
        return []
    last = records[-1].get("run")
    mine = [r for r in records if r.get("run") == last]
    first = min(r["step"] for r in mine)
    before: dict[int, dict] = {}
    for r in records:
        if r.get("run") != last and r["step"] < first:
            before[r["step"]] = r
    return [before[s] for s in sorted(before)] + mine
