"""Server errors as typed exceptions carrying the server's message and status."""

from __future__ import annotations

import openai


class DualFocusError(Exception):
    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.code = message, status, code

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status})" if self.status else self.message


class BadRequest(DualFocusError):
    """400 or 413: the request or its image was refused."""


class AuthenticationFailed(DualFocusError):
    """401: missing or wrong API key."""


class ModelNotFound(DualFocusError):
    """404: the server does not serve that model."""


class RateLimited(DualFocusError):
    """429: the server is at its limit; retry after `retry_after` seconds."""

    retry_after: float | None = None


class ServerUnavailable(DualFocusError):
    """503 (loading, or the engine stopped) or another 5xx."""


class ServerUnreachable(DualFocusError):
    """No HTTP answer at all: wrong URL, server down, network."""


_BY_STATUS = {400: BadRequest, 413: BadRequest, 401: AuthenticationFailed, 404: ModelNotFound, 429: RateLimited}


def translate(e: openai.OpenAIError, base_url: str) -> DualFocusError:
    if isinstance(e, openai.APIConnectionError):
        return ServerUnreachable(f"cannot reach the DualFocus server at {base_url}: {e.__cause__ or e}")
    if isinstance(e, openai.APIStatusError):
        body = e.body if isinstance(e.body, dict) else {}
        error = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
        message = error.get("message") or str(e)
        cls = _BY_STATUS.get(e.status_code, ServerUnavailable if e.status_code >= 500 else DualFocusError)
        err = cls(message, e.status_code, error.get("code"))
        if isinstance(err, RateLimited):
            retry = e.response.headers.get("retry-after")
            err.retry_after = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
        return err
    return DualFocusError(str(e))
