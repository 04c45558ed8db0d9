"""DualFocus on vLLM: a macro pass, a box, a zoomed-in micro pass and perplexity fusion per request."""

from .config import EngineConfig
from .engine import DualFocusEngine
from .protocol import EngineClient, EngineCounters, ModelInfo
from .query import Query, Sampling, Turn
from .trace import Result, TokenLogprob, Trace

__all__ = [
    "DualFocusEngine",
    "EngineClient",
    "EngineConfig",
    "EngineCounters",
    "ModelInfo",
    "Query",
    "Result",
    "Sampling",
    "TokenLogprob",
    "Trace",
    "Turn",
]
