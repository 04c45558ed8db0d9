"""The engine's own failures: what callers (the server) catch, whatever vLLM raised underneath.

The pass runner translates vLLM's exceptions into these (engine/runner.py), so nothing
outside the engine imports vLLM to tell a bad request from a dead engine.
"""

from __future__ import annotations


class EngineError(Exception):
    """A request failed in the engine."""


class InvalidRequestError(EngineError):
    """The request cannot run as sent (a prompt longer than the context, a bad parameter)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class RequestRefusedError(EngineError):
    """The engine's admission control refused the request for now (vLLM's queue is full);
    `status` is the HTTP status vLLM gives the refusal (503 for a full queue)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class GenerationFailedError(EngineError):
    """The engine failed while running the request."""


class RetryableEngineError(GenerationFailedError):
    """A transient failure, already retried once in the engine; the client may retry."""


class EngineDeadError(EngineError):
    """The engine has stopped; nothing more will be served."""
