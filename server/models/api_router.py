"""GET /v1/models."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from engine import EngineClient

from ..deps import ready_engine, require_api_key, settings
from ..errors import error_responses
from ..settings import ServerSettings
from .protocol import ModelCard, ModelList

router = APIRouter(dependencies=[Depends(require_api_key)])
_CREATED = int(time.time())


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 503))
async def list_models(
    engine: EngineClient = Depends(ready_engine), settings: ServerSettings = Depends(settings)
) -> ModelList:
    info = engine.model_info
    return ModelList(
        data=[
            ModelCard(
                id=settings.model_name,
                created=_CREATED,
                owned_by="dualfocus-serve",
                max_model_len=info.max_model_len,
                family=info.family,
            )
        ]
    )
