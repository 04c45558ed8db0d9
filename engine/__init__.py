"""DualFocus on vLLM: a macro pass, a box, a zoomed-in micro pass and perplexity fusion per request."""

from .config import EngineConfig
from .engine import DualFocusEngine, Query, Sampling
from .trace import Result, Trace

__all__ = ["DualFocusEngine", "EngineConfig", "Query", "Result", "Sampling", "Trace"]
