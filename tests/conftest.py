import os

# Triton kernels run on CPU tensors under the interpreter when no GPU is present. The
# variable must be set before any kernel module is imported (triton.jit reads it then).
try:
    import torch

    _has_gpu = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_gpu = False
if not _has_gpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")
