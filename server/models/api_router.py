"""GET /v1/models."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from ..deps import ready_engine, require_api_key, settings

router = APIRouter(dependencies=[Depends(require_api_key)])
_CREATED = int(time.time())


@router.get("/v1/models")
async def list_models(engine=Depends(ready_engine), settings=Depends(settings)):
    return {"object": "list", "data": [{
        "id": settings.model_name, "object": "model", "created": _CREATED, "owned_by": "dualfocus-serve",
        "max_model_len": engine.max_model_len, "family": engine.adapter.name,
    }]}
