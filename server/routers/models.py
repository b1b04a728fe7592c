"""/v1/models: the one model this server serves."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.deps import get_runtime, get_tenant
from server.runtime import Runtime

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models")
async def list_models(rt: Runtime = Depends(get_runtime), tenant: str = Depends(get_tenant)):
    cfg = rt.model.config
    return {"object": "list", "data": [{
        "id": rt.model_name, "object": "model", "created": rt.created, "owned_by": "titans-server",
        "root": rt.model_name, "parent": None, "max_model_len": None,
        "capabilities": {"memory": {"variant": cfg.variant, "fingerprint": rt.model.fingerprint,
                                    "state_bytes": rt.state_bytes}}}]}
