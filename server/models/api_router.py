"""GET /v1/models."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from ..deps import ready_engine, require_api_key, settings
from ..errors import error_responses
from .protocol import ModelCard, ModelList

router = APIRouter(dependencies=[Depends(require_api_key)])
_CREATED = int(time.time())


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 503))
async def list_models(engine=Depends(ready_engine), settings=Depends(settings)) -> ModelList:
    return ModelList(data=[ModelCard(id=settings.model_name, created=_CREATED, owned_by="dualfocus-serve",
                                     max_model_len=engine.max_model_len, family=engine.adapter.name)])
