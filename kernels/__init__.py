"""Triton kernels of the fast path, installed as `fastground.kernels`."""

if __name__ == "kernels":
    # Imported by its folder name: `python -m ...` run from a source checkout puts the checkout
    # on sys.path, and this folder then shadows the Hugging Face `kernels` package that
    # transformers imports (and requires). Hand the name to the installed package; this
    # folder is only ever meant to be reached as `fastground.kernels`.
    import os as _os
    import sys as _sys
    import importlib as _importlib

    _here = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _saved = list(_sys.path)
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _here]
    del _sys.modules["kernels"]
    try:
        _real = _importlib.import_module("kernels")
    finally:
        _sys.path[:] = _saved
    _sys.modules["kernels"] = _real
