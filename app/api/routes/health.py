"""Liveness, readiness and the Prometheus metrics (`metrics`: a router of its own, behind the API key when the
operator says so)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..schemas import ErrorBody
from ..service import Ready, ServiceDep

router = APIRouter(tags=["health"])
metrics = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Model, index and cost profile are loaded (503 until then)",
            responses={503: {"model": ErrorBody}})
def readyz(_: Ready) -> dict:
    return {"status": "ready"}


@metrics.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
def metrics_text(service: ServiceDep) -> Response:
    return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)
