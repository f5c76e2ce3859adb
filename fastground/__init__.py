"""fastground: an exact, fast engine for GroundingGPT."""
from fastground.config import GroundingGPTConfig

__all__ = ["GroundingGPTConfig"]
__version__ = "0.1.0"
