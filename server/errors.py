"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import (
    EngineDeadError,
    EngineError,
    GenerationFailedError,
    InvalidRequestError,
    RequestRefusedError,
    RetryableEngineError,
)

log = logging.getLogger("dualfocus.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every error response (for the OpenAPI schema)."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict:
    """OpenAPI `responses` for a route's error statuses."""
    return {status: {"model": ErrorResponse} for status in statuses}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def as_api_error(e: Exception) -> APIError:
    """What the client is told about a failure, whether it is raised here or in the engine."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, InvalidRequestError):
        # The engine refusing what the client sent (prompt longer than the context, bad parameters).
        return APIError(400, str(e), param=e.param)
    if isinstance(e, RequestRefusedError):  # e.g. vLLM's own queue full (503)
        retry = {"Retry-After": "1"} if e.status in (429, 503) else None
        return APIError(e.status, str(e), headers=retry)
    if isinstance(e, RetryableEngineError):  # already retried once in the engine
        return APIError(503, str(e), code="engine_retryable_error", headers={"Retry-After": "1"})
    if isinstance(e, GenerationFailedError):
        return APIError(500, str(e), code="engine_error")
    if isinstance(e, EngineDeadError):
        return APIError(503, "the engine has stopped", code="engine_dead")
    log.error("unexpected error", exc_info=e)
    return APIError(500, "internal error", code="internal_error")


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return api_error_response(APIError(status, message, param, code, headers))


def api_error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def install_error_handlers(app: FastAPI) -> None:
    async def _mapped(_: Request, e: Exception) -> JSONResponse:
        return api_error_response(as_api_error(e))

    # The failures we expect, named one by one; anything else is answered by the request-id
    # middleware (server/app.py), which is outside Starlette's catch-all and so can still
    # add the request id to the 500.
    for kind in (APIError, EngineError):
        app.add_exception_handler(kind, _mapped)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = first.get("msg", "invalid request")
        return error_response(400, f"{loc}: {msg}" if loc else msg, param=loc or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail))
