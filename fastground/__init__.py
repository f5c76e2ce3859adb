"""fastground: an exact, fast engine for GroundingGPT."""
from fastground.config import GroundingGPTConfig

__all__ = ["GroundingGPTConfig", "GroundingGPT", "patch", "unpatch"]
__version__ = "0.1.0"


def __getattr__(name):
    # The model pulls in transformers (seconds to import); data tools and the demo
    # generator should not pay for it.
    if name == "GroundingGPT":
        from fastground.model.groundinggpt import GroundingGPT
        return GroundingGPT
    raise AttributeError(f"module 'fastground' has no attribute {name!r}")


def patch(model, **kwargs):
    """Swap the Q-Formers, adapters and video/audio branches (recognised by structure, whatever
    their class) for the fused Triton ones in place (same parameters); `strict=True` raises
    instead of warning about a module it cannot swap. See fastground.fast.patching."""
    from fastground.fast.patching import patch as _patch
    return _patch(model, **kwargs)


def unpatch(model):
    """Revert `patch(model)`."""
    from fastground.fast.patching import unpatch as _unpatch
    return _unpatch(model)
