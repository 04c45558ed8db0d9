"""GET /v1/models's response, as OpenAI shapes it (with the served model's context length and family)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int
    family: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
