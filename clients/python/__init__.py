"""A Python client for DualFocus Serve, built on the official openai SDK.

from clients.python import DualFocusClient
client = DualFocusClient("http://127.0.0.1:8000")
result = client.ask("photo.jpg", "What does the sign say?")
print(result.answer, result.chosen, result.box)
"""

from .client import AsyncDualFocusClient, DualFocusClient
from .errors import (
    AuthenticationFailed,
    BadRequest,
    DualFocusError,
    ModelNotFound,
    RateLimited,
    ServerUnavailable,
    ServerUnreachable,
)
from .result import AskResult, StageTiming, Usage

__all__ = [
    "AskResult",
    "AsyncDualFocusClient",
    "AuthenticationFailed",
    "BadRequest",
    "DualFocusClient",
    "DualFocusError",
    "ModelNotFound",
    "RateLimited",
    "ServerUnavailable",
    "ServerUnreachable",
    "StageTiming",
    "Usage",
]
