"""One log format for every line the service prints, in both of its processes (this one and
vLLM's engine core), each line tagged with the request it belongs to ("-" for none).

The format lives in logging.json; vLLM reads the same file (VLLM_LOGGING_CONFIG_PATH), so
its loggers, uvicorn's and ours all go through one handler. What is logged about a request
is its id, mode, outcome and timings: never image bytes, prompts or keys."""

from __future__ import annotations

import json
import logging
import logging.config
import os
from contextvars import ContextVar
from pathlib import Path

CONFIG_PATH = Path(__file__).with_name("logging.json")

# Set by the request-id middleware for the request's task (and tasks it creates).
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def configure_logging() -> None:
    """Use logging.json here, and have vLLM's processes use it too."""
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(CONFIG_PATH)
    logging.config.dictConfig(json.loads(CONFIG_PATH.read_text()))
    logging.captureWarnings(True)
