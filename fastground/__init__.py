"""fastground: an exact, fast engine for GroundingGPT."""
from fastground.config import GroundingGPTConfig
from fastground.model.groundinggpt import GroundingGPT


def patch(model):
    """Swap the reference Q-Formers, adapters and video/audio branches for the fused Triton
    ones in place (same parameters). See fastground.fast.patching."""
    from fastground.fast.patching import patch as _patch
    return _patch(model)


def unpatch(model):
    """Revert `patch(model)`."""
    from fastground.fast.patching import unpatch as _unpatch
    return _unpatch(model)


__all__ = ["GroundingGPTConfig", "GroundingGPT", "patch", "unpatch"]
__version__ = "0.1.0"
