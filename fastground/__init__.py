"""fastground: an exact, fast engine for GroundingGPT."""
from fastground.config import GroundingGPTConfig
from fastground.model.groundinggpt import GroundingGPT

__all__ = ["GroundingGPTConfig", "GroundingGPT"]
__version__ = "0.1.0"
