"""Fast (Triton) modules: `fastground.patch` swaps them in; `graphed` captures a branch in a
CUDA graph."""


def graphed(fn, sample_args, num_warmup_iters: int = 3):
    from fastground.fast.graphs import graphed as _graphed
    return _graphed(fn, sample_args, num_warmup_iters)
