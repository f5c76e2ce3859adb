"""The kernel runtime module (fastground.kernels.runtime) is the one place that decides
whether Triton runs, the fp32 precision, the dropout seeds and how launches are made; its
launch recorder shows what the fast path launches: the precision of every fp32 product, the
number of launches of a branch step, and the shape of the dPE product."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import fastground.kernels as kernels_pkg
from fastground.fast.launch_count import branch_launches
from fastground.kernels import runtime
from fastground.kernels.kv_proj_pe import kv_proj_pe
from tolerances import rel_err

KERNEL_DIR = Path(kernels_pkg.__file__).parent
FAST_DIR = Path(__file__).resolve().parents[1] / "fastground" / "fast"
# Files allowed to make the decisions: the runtime itself, the interpreter patch it applies,
# and the AOT compiler (it compiles, never launches).
DECIDERS = {"runtime.py", "interpreter_fixes.py", "aot.py", "__init__.py"}
FORBIDDEN = {
    "allow_tf32": "the fp32 precision policy",
    "float32_matmul_precision": "the fp32 precision policy",
    "knobs.runtime.interpret": "whether Triton runs",
    "\"TRITON_INTERPRET\"": "whether Triton runs",
    "'TRITON_INTERPRET'": "whether Triton runs",
    "torch.randint": "the dropout seed convention",
    "input_precision=\"": "the fp32 precision policy (a literal precision)",
    "triton.cdiv(": "host integer helpers (runtime.cdiv)",
    "triton.next_power_of_2(": "host integer helpers (runtime.pow2)",
}
# a direct kernel launch: name[grid](...)
DIRECT_LAUNCH = re.compile(r"\b_\w+_kernel\[[^\]]+\]\(")

DOT_KERNELS = {"_gemm_kernel", "_kv_fwd_kernel", "_kv_bwd_dx_kernel", "_kv_bwd_dw_kernel",
               "_attn_fwd_kernel", "_attn_bwd_kernel"}


def _sources():
    files = [p for p in KERNEL_DIR.glob("*.py") if p.name not in DECIDERS]
    files += [p for p in FAST_DIR.glob("*.py") if p.name != "runtime.py"]
    assert len(files) >= 8
    return files


def test_kernel_files_take_every_decision_from_the_runtime():
    bad = []
    for path in _sources():
        text = path.read_text()
        for needle, what in FORBIDDEN.items():
            if needle in text:
                bad.append(f"{path.name}: decides {what} itself ({needle!r})")
        if DIRECT_LAUNCH.search(text):
            bad.append(f"{path.name}: launches a kernel without runtime.launch")
        if path.parent == KERNEL_DIR and "@triton.jit" in text and "from .runtime import" not in text:
            bad.append(f"{path.name}: holds kernels but does not import the runtime")
    assert not bad, "\n".join(bad)


def test_integer_helpers_match_triton():
    import triton
    for n in [0, 1, 2, 3, 15, 16, 17, 1000, 2048, 2049]:
        assert runtime.pow2(n) == triton.next_power_of_2(max(n, 1))
        for d in (1, 16, 64, 128):
            assert runtime.cdiv(n, d) == triton.cdiv(n, d)
    assert runtime.pow2(3, 16, 64) == 16 and runtime.pow2(1000, 16, 64) == 64


def test_seed_convention():
    torch.manual_seed(5)
    a = runtime.draw_seed()
    torch.manual_seed(5)
    assert runtime.draw_seed() == a and 0 <= a < 2 ** 31
    for s in (0, 1, 2 ** 40, 2 ** 63 - 1):
        assert 2 ** 62 <= runtime.philox_key(s) < 2 ** 63


# --------------------------------------------------------------------------- fp32 precision
def _precisions(recorded, dtype):
    return {(l.kernel.fn.__name__, l.constexprs["PRECISION"]) for l in recorded
            if "PRECISION" in l.constexprs and l.args[0].dtype == dtype}


@pytest.fixture
def tf32_switches():
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    yield
    torch.backends.cuda.matmul.allow_tf32 = prev[0]
    torch.set_float32_matmul_precision(prev[1])


@pytest.mark.parametrize("which", ["video", "audio"])
def test_fp32_branch_launches_exact_fp32_unless_tf32_allowed(which, tf32_switches):
    """Every product of the fp32 fast path, forward and backward, at release shapes, launches
    with input_precision="ieee"; only the user's TF32 switches turn it to "tf32"."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    exact = _precisions(branch_launches(which, 2, dtype=torch.float32).triton, torch.float32)
    assert {name for name, _ in exact} == DOT_KERNELS
    assert {p for _, p in exact} == {"ieee"}, exact

    torch.backends.cuda.matmul.allow_tf32 = True
    assert {p for _, p in _precisions(branch_launches(which, 2, dtype=torch.float32).triton, torch.float32)} == {"tf32"}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("high")
    assert {p for _, p in _precisions(branch_launches(which, 2, dtype=torch.float32).triton, torch.float32)} == {"tf32"}


def test_bf16_launches_ignore_the_tf32_switch(tf32_switches):
    torch.backends.cuda.matmul.allow_tf32 = True
    got = _precisions(branch_launches("video", 2, dtype=torch.bfloat16).triton, torch.bfloat16)
    assert {p for _, p in got} == {"ieee"}  # one compiled variant whatever the switch


def test_trace_records_running_launches():
    """trace_launches logs what really ran (here under the interpreter): name, grid, precision."""
    x = torch.randn(2, 6, 24)
    pe = torch.randn(3, 24)
    w = [torch.randn(16, 24) for _ in range(2)]
    with runtime.trace_launches() as log:
        k, _ = kv_proj_pe(x, pe, 2, 3, w[0], None, w[1], None)
    assert [r.name for r in log] == ["_kv_fwd_kernel"]
    assert log[0].precision == "ieee" and log[0].dtype == torch.float32 and len(log[0].grid) == 1
    assert torch.allclose(k, (x + pe.repeat_interleave(2, 0)) @ w[0].T, atol=1e-5)


# --------------------------------------------------------------------------- launch counts
# One video-branch training step (forward + backward, dropout on) at the release shapes,
# batch 8. Before issue 12: 105 Triton launches (plus a weight torch.cat per call and 4
# slice-backward copies). Now: the bias gradients come out of the weight-gradient GEMMs, the
# three LayerNorm column sums and the four K/V weight-gradient partial sums are one launch
# each, attention backward computes its own delta.
VIDEO_STEP_MAX_LAUNCHES = 77
AUDIO_STEP_MAX_LAUNCHES = 71


def test_video_branch_step_launch_count():
    count = branch_launches("video", 8)
    print(count.summary())
    assert len(count.triton) <= VIDEO_STEP_MAX_LAUNCHES, count.summary()
    names = count.triton_names
    assert "_bias_grad_kernel" not in names or names.count("_bias_grad_kernel") <= 2  # GELU backward only
    assert "_attn_bwd_delta_kernel" not in names
    # the K/V gradients of the two cross-attention layers are joined by one cat each, not by
    # zero-filled slice gradients added together
    assert "slice_backward" not in count.other and count.other.count("cat") <= 2 + 10, count.summary()


def test_audio_branch_step_launch_count():
    count = branch_launches("audio", 8)
    assert len(count.triton) <= AUDIO_STEP_MAX_LAUNCHES, count.summary()


def test_frozen_weights_are_concatenated_once_not_per_call():
    """Fused Q|K|V and K/V weights of a frozen Q-Former (the frame Q-Former) are built once and
    reused while the parameters are unchanged: a second forward concatenates nothing (and runs
    no device op but the embeddings' LayerNorm and dropout)."""
    count = branch_launches("video", 2, repeat=2, backward=False, frozen=True)
    assert "cat" not in count.other, count.summary()
    assert len(count.other) <= 4, count.summary()


def test_trainable_weights_are_concatenated_every_call():
    """Trainable weights may be updated through `.data` (DeepSpeed ZeRO does so), which no
    version counter sees: their concatenation is made anew each call."""
    count = branch_launches("video", 2, repeat=2, backward=False)
    assert count.other.count("cat") == 8, count.summary()  # Q|K|V weight and bias x 2 layers, K, V x 2


@pytest.mark.parametrize("frozen", [False, True])
def test_fast_qformer_sees_weights_written_through_data(frozen):
    """An update written through `.data` (as DeepSpeed's optimizer writes it) reaches the fast
    forward; for frozen weights a load (copy_ under no_grad) does. A stale fused copy once made
    the trainer's fast path compute with the previous step's weights."""
    import copy
    from fastground.fast.patching import patch
    from fastground.fast.qformer import to_fast
    from fastground.model.qformer import QFormer, QFormerSpec
    torch.manual_seed(0)
    ref = QFormer(QFormerSpec(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                              encoder_width=24, cross_attention_freq=1, hidden_dropout=0.0,
                              attention_dropout=0.0)).eval()
    ref.requires_grad_(not frozen)
    fast = to_fast(copy.deepcopy(ref))
    q, x = torch.randn(2, 5, 32), torch.randn(2, 7, 24)
    for step in range(3):
        want = ref.bert(query_embeds=q, encoder_hidden_states=x).last_hidden_state
        got = fast.bert(query_embeds=q, encoder_hidden_states=x).last_hidden_state
        assert rel_err(got, want) <= 1e-5, step
        with torch.no_grad():
            noise = {n: 0.1 * torch.randn_like(p) for n, p in ref.named_parameters()}
            for name, p in ref.named_parameters():
                p.add_(noise[name])
            for name, p in fast.named_parameters():
                if frozen:
                    p.copy_(p + noise[name])
                else:
                    p.data.add_(noise[name])


# --------------------------------------------------------------------------- dPE product
@pytest.mark.parametrize("x_grad", [False, True])
def test_dpe_is_a_positions_by_width_product_when_x_needs_no_grad(x_grad):
    """With a frozen input (the frame features), dPE = (per-position sums of dK, dV) @ W: the
    (rows x width) dX GEMM is not launched; with x trainable it is (and dPE reduces dX)."""
    torch.manual_seed(0)
    B, T, R, din, dout = 2, 5, 16, 24, 16  # 160 rows, 5 positions
    x = torch.randn(B, T * R, din, requires_grad=x_grad)
    pe = torch.randn(T + 1, din, requires_grad=True)
    wk, wv = (torch.randn(dout, din, requires_grad=True) for _ in range(2))
    k, v = kv_proj_pe(x, pe, R, T, wk, None, wv, None)
    gk, gv = torch.randn_like(k), torch.randn_like(v)
    with runtime.trace_launches() as log:
        torch.autograd.backward((k, v), (gk, gv))
    dx_rows = [r.args[6] for r in log if r.name == "_kv_bwd_dx_kernel"]
    assert dx_rows == ([B * T * R] if x_grad else [T + 1])
    pos = (torch.arange(B * T * R) // R) % T
    xpe = (x.detach().reshape(-1, din) + pe.detach()[pos]).double()
    dxpe = gk.double().reshape(-1, dout) @ wk.detach().double() + gv.double().reshape(-1, dout) @ wv.detach().double()
    ref = torch.zeros(T + 1, din, dtype=torch.double).index_add_(0, pos, dxpe)
    assert torch.allclose(pe.grad.double(), ref, rtol=1e-5, atol=1e-4)
    assert torch.allclose(wk.grad.double(), gk.double().reshape(-1, dout).T @ xpe, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 8, 64])
def test_attention_backward_fills_whole_waves(batch):
    """No tail wave: the backward's programs fit one wave of 2 per SM, or are one per head."""
    count = branch_launches("video", batch)
    for launch in count.triton:
        if launch.kernel.fn.__name__ == "_attn_bwd_kernel":
            chunks, heads = launch.grid
            assert chunks == 1 or chunks * heads <= 2 * 132, launch.grid


def test_kernels_folder_does_not_shadow_the_hub_kernels_package():
    """From a source checkout, `python -m` puts the checkout on sys.path; the `kernels/` folder
    must not then stand in for the Hugging Face `kernels` package that transformers imports."""
    import importlib.metadata
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    code = ("import kernels, fastground.kernels as ours, pathlib; "
            "print(pathlib.Path(kernels.__file__).resolve() != pathlib.Path(ours.__file__).resolve())")
    try:
        installed = bool(importlib.metadata.version("kernels"))
    except importlib.metadata.PackageNotFoundError:
        installed = False
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    if installed:
        assert run.returncode == 0 and run.stdout.strip() == "True", run.stderr
    else:
        assert "No module named 'kernels'" in run.stderr, run.stderr
