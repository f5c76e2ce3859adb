"""Ahead-of-time compilation of the Triton kernels for a CUDA arch, without a GPU.

Used by the tests to prove every kernel configuration a launcher can pick compiles for
sm_80 / sm_90 and that its shared memory fits the chip.

    compiled, smem = compile_for(kernel, signature, constexprs, cc=90, num_warps=8, num_stages=3)
    assert smem <= SMEM_LIMIT[90]

Under TRITON_INTERPRET=1, `triton.jit` hands back interpreter objects, and so does every
helper it reaches (tl.rand included): the code generator rejects those. The compilation then
runs in a child Python without TRITON_INTERPRET, one child per `compile_many` batch, and the
caller gets a `CompiledInfo` carrying the same `.metadata` fields and `.asm` texts.
"""
from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

# Largest dynamic shared memory one block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SMEM_LIMIT = {
    80: 166912,  # A100: 163 KiB
    86: 101376,  # consumer Ampere: 99 KiB
    89: 101376,  # Ada: 99 KiB
    90: 232448,  # H100/H200: 227 KiB
}


@dataclass
class CompiledInfo:
    """What a child compilation sends back: enough to inspect, not to launch."""

    name: str
    metadata: Any
    asm: dict = field(default_factory=dict)


@dataclass
class Job:
    kernel: Any
    signature: dict
    constexprs: dict
    cc: int
    num_warps: int = 4
    num_stages: int = 3


def _is_interpreted(kernel) -> bool:
    from triton.runtime.jit import JITFunction
    return not isinstance(kernel, JITFunction)


def _kernel_ref(kernel) -> tuple[str, str]:
    fn = getattr(kernel, "fn", kernel)
    return fn.__module__, fn.__name__


def _compile_here(kernel, signature, constexprs, cc, num_warps, num_stages):
    import triton
    from triton.backends.compiler import GPUTarget

    # "*bf16:16" / "i32:16": the launcher sees a 16-divisible value there (aligned base
    # pointer, row stride a multiple of 16), which is what lets loads vectorise and go
    # through cp.async / TMA; without the hint the smem figure would describe another kernel.
    sig, attrs = {}, {}
    for name, ty in signature.items():
        ty, _, hint = ty.partition(":")
        sig[name] = ty
        if hint == "16":
            attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=dict(constexprs), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _plain(compiled, keep_asm: bool) -> tuple[str, dict, dict]:
    # Plain types only: the child runs this file as __main__, whose classes the parent
    # could not unpickle.
    md = compiled.metadata
    md = md._asdict() if hasattr(md, "_asdict") else dict(vars(md))
    asm = {k: v for k, v in compiled.asm.items() if isinstance(v, (str, bytes))} if keep_asm else {}
    return compiled.name, md, asm


def compile_many(jobs: list[Job], keep_asm: bool = False, workers: int = 2) -> list[tuple[Any, int]]:
    """Compile a batch; returns [(compiled, shared_bytes)] in job order. When interpreting,
    one child process for the whole batch (starting one costs seconds), compiling on up to
    `workers` forked processes. keep_asm: also bring back ptx/cubin (for resource_usage)."""
    if not jobs:
        return []
    if not any(_is_interpreted(j.kernel) for j in jobs):
        out = []
        for j in jobs:
            c = _compile_here(j.kernel, j.signature, j.constexprs, j.cc, j.num_warps, j.num_stages)
            out.append((c, c.metadata.shared))
        return out
    payload = [(_kernel_ref(j.kernel), j.signature, j.constexprs, j.cc, j.num_warps, j.num_stages)
               for j in jobs]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", __name__], input=pickle.dumps((payload, keep_asm, workers)),
                          capture_output=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError("AOT compilation failed:\n" + proc.stderr.decode(errors="replace")[-6000:])
    infos = [CompiledInfo(name=n, metadata=SimpleNamespace(**md), asm=asm)
             for n, md, asm in pickle.loads(proc.stdout)]
    return [(i, i.metadata.shared) for i in infos]


def compile_for(kernel, signature: dict, constexprs: dict, cc: int, num_warps: int = 4,
                num_stages: int = 3):
    """(compiled, shared_bytes) for one configuration on sm_<cc>. `signature` maps every
    argument name to its type string ("*bf16", "i32", "fp32", "constexpr"); `constexprs`
    gives the values of the constexpr ones. A type may carry ":16" ("*bf16:16", "i32:16")
    to say the launched value is divisible by 16, as Triton's own JIT specialisation does."""
    return compile_many([Job(kernel, signature, constexprs, cc, num_warps, num_stages)])[0]


def fits(shared_bytes: int, cc: int) -> bool:
    return shared_bytes <= SMEM_LIMIT[cc]


def resource_usage(compiled) -> dict:
    """{"registers", "local", "stack"} per thread from the cubin (cuobjdump, shipped with
    Triton); local/stack > 0 means register spills. Needs the cubin: compile_many(keep_asm=True)
    when interpreting."""
    import re
    import shutil
    import tempfile

    import triton.backends.nvidia as nv

    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    get = lambda key: int(re.search(rf"\b{key}:(\d+)", text).group(1))
    return {"registers": get("REG"), "local": get("LOCAL"), "stack": get("STACK")}


def _child_one(item):
    (mod, name), sig, consts, cc, nw, ns, keep_asm = item
    kernel = getattr(importlib.import_module(mod), name)
    return _plain(_compile_here(kernel, sig, consts, cc, nw, ns), keep_asm)


def _child() -> None:
    payload, keep_asm, workers = pickle.loads(sys.stdin.buffer.read())
    items = [p + (keep_asm,) for p in payload]
    for (mod, _), *_ in payload:
        importlib.import_module(mod)  # once, before forking
    if workers > 1 and len(items) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(items)), mp_context=mp.get_context("fork")) as ex:
            infos = list(ex.map(_child_one, items))
    else:
        infos = [_child_one(i) for i in items]
    sys.stdout.buffer.write(pickle.dumps(infos))


if __name__ == "__main__":
    _child()


# --------------------------------------------------------------------------- launching
# Every launcher in fastground.kernels goes through `runtime.launch`, so a test can run the
# real launcher on "meta" tensors at release shapes and collect exactly the configurations it
# would launch (`record_launches`), then compile those: the AOT check cannot drift from
# what the code does. The switch lives in the runtime module; re-exported here.
from .runtime import device_sms, launch, record_launches  # noqa: E402,F401


@dataclass
class Launch:
    kernel: Any
    grid: tuple
    args: tuple
    constexprs: dict
    num_warps: int
    num_stages: int

    def signature(self) -> tuple[dict, dict]:
        """Signature and constexprs as Triton's JIT would specialise these arguments."""
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        names = list(self.kernel.arg_names)
        if hasattr(self.kernel, "params"):
            fixed = {p.name for p in self.kernel.params if p.do_not_specialize}
        else:  # interpreter object: the decorator's keywords
            dns = (getattr(self.kernel, "kwargs", None) or {}).get("do_not_specialize") or ()
            fixed = {names[d] if isinstance(d, int) else d for d in dns}
        sig, consts = {}, {}
        positional = [n for n in names if n not in self.constexprs]
        assert len(positional) == len(self.args), (self.kernel, positional, len(self.args))
        for name, value in zip(positional, self.args):
            ty, attr = native_specialize_impl(BaseBackend, value, False, name not in fixed, True)[:2]
            if ty == "constexpr":
                sig[name] = "constexpr"
                consts[name] = attr
            else:
                sig[name] = ty + (":16" if attr == "D" else "")
        for name, value in self.constexprs.items():
            sig[name] = "constexpr"
            consts[name] = value
        return {n: sig[n] for n in names}, consts

    def job(self, cc: int) -> Job:
        sig, consts = self.signature()
        return Job(self.kernel, sig, consts, cc, self.num_warps, self.num_stages)

    def key(self) -> tuple:
        sig, consts = self.signature()
        return (_kernel_ref(self.kernel), tuple(sorted(sig.items())), tuple(sorted(consts.items())),
                self.num_warps, self.num_stages)
