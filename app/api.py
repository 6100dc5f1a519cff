"""The REST API (FastAPI). It validates requests and calls `retrieval.Retriever`; it holds no model logic.

Errors are JSON `{"error": {"code", "message"}}`; user input never causes a 500. Inference runs in
worker threads (never on the event loop), at most `inference_slots` at a time.
"""

from __future__ import annotations

import base64
import binascii
import io
import mimetypes
import os
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException

from matvit import data
from matvit.errors import UserError
from matvit.images import ImageError, ImageTooLarge
from retrieval.budget import Budget, BudgetError
from retrieval.encoder import Encoder
from retrieval.retriever import Retriever


@dataclass
class Settings:
    index: Path
    checkpoint: Path
    api_key: str | None = None
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_batch: int = 32
    inference_slots: int = 2
    encoder_cache: int = 8


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# --- request and response models ---------------------------------------------------------------
class SearchOptions(BaseModel):
    """How to search: how many neighbours, and at most one way to pick the query submodel."""

    k: int = Field(10, ge=1, le=1000, description="neighbours to return")
    submodel: str | None = Field(None, description="spec text, e.g. `S` or `S,S,M,M,L,XL`", examples=["S"])
    budget_ms: float | None = Field(None, gt=0, description="latency budget at batch 1 on this server")
    budget_gflops: float | None = Field(None, gt=0, description="forward GFLOPs budget per image")

    @model_validator(mode="after")
    def one_choice(self) -> SearchOptions:
        if sum(v is not None for v in (self.submodel, self.budget_ms, self.budget_gflops)) > 1:
            raise ValueError("give at most one of submodel, budget_ms, budget_gflops")
        return self


class SearchJson(SearchOptions):
    """A JSON query: a base64-encoded image, or a ready-made embedding."""

    image_b64: str | None = Field(None, description="the query image's file bytes, base64-encoded")
    embedding: list[float] | None = Field(None, description="a query embedding of the index's dimension")

    @model_validator(mode="after")
    def one_query(self) -> SearchJson:
        if (self.image_b64 is None) == (self.embedding is None):
            raise ValueError("give exactly one of image_b64 or embedding")
        return self

    model_config = {"json_schema_extra": {"examples": [{"image_b64": "iVBORw0KGgo...", "k": 5, "submodel": "S"},
                                                       {"embedding": [0.1, 0.0, 0.3], "k": 3}]}}


class BatchJson(SearchOptions):
    images_b64: list[str] = Field(..., min_length=1, description="base64-encoded image files")


class Neighbour(BaseModel):
    rank: int
    id: int
    score: float
    label: str | None
    metadata: dict[str, Any]


class SubmodelUsed(BaseModel):
    id: str
    spec: str
    gflops: float


class Timings(BaseModel):
    decode: float
    encode: float
    search: float
    total: float


class SearchResponse(BaseModel):
    results: list[Neighbour]
    submodel: SubmodelUsed | None = Field(None, description="None for embedding queries")
    timings_ms: Timings

    model_config = {"json_schema_extra": {"examples": [{
        "results": [{"rank": 1, "id": 5012, "score": 0.97, "label": "ankle-boot",
                     "metadata": {"id": 5012, "source": "fashion-mnist:train:5012", "label": 9, "width": 28,
                                  "height": 28, "added_at": "2026-11-22T11:26:00+00:00", "label_name": "ankle-boot"}}],
        "submodel": {"id": "S", "spec": "S", "gflops": 0.0178},
        "timings_ms": {"decode": 0.5, "encode": 3.6, "search": 5.1, "total": 9.2}}]}}


class BatchResponse(BaseModel):
    responses: list[SearchResponse]


class IndexInfo(BaseModel):
    count: int
    dimension: int
    index_key: str
    model_fingerprint: str
    submodel: str

    model_config = {"json_schema_extra": {"examples": [{
        "count": 60000, "dimension": 128, "index_key": "Flat", "model_fingerprint": "3f1c0a9b2d4e5f60",
        "submodel": "XL"}]}}


class SubmodelRow(BaseModel):
    id: str
    spec: str
    params: int
    gflops: float
    latency_ms_b1: float | None = None
    latency_ms_b32: float | None = None
    knn1: float | None = None

    model_config = {"json_schema_extra": {"examples": [{
        "id": "S-S-M-M-L-XL", "spec": "S,S,M,M,L,XL", "params": 706442, "gflops": 0.0245, "latency_ms_b1": 2.9,
        "latency_ms_b32": 21.4, "knn1": 0.851}]}}


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail

    model_config = {"json_schema_extra": {"examples": [{
        "error": {"code": "bad_request",
                  "message": "unknown granularity 'XXL' in submodel spec; allowed: S, M, L, XL"}}]}}


ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 404, 413, 415, 422, 503)}
MULTIPART_DOC = {
    "requestBody": {"content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary", "description": "the query image"},
            "k": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 10},
            "submodel": {"type": "string", "example": "S"},
            "budget_ms": {"type": "number", "exclusiveMinimum": 0},
            "budget_gflops": {"type": "number", "exclusiveMinimum": 0}}}},
        "application/json": {"schema": SearchJson.model_json_schema(ref_template="#/components/schemas/{model}")},
    }, "required": True},
}
BATCH_DOC = {
    "requestBody": {"content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "k": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 10},
            "submodel": {"type": "string"}, "budget_ms": {"type": "number", "exclusiveMinimum": 0},
            "budget_gflops": {"type": "number", "exclusiveMinimum": 0}}}},
        "application/json": {"schema": BatchJson.model_json_schema(ref_template="#/components/schemas/{model}")},
    }, "required": True},
}


# --- the service --------------------------------------------------------------------------------
class Service:
    """The loaded retriever, its readiness, the inference gate and the metrics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.retriever: Retriever | None = None
        self.load_error: str | None = None
        self.slots = threading.Semaphore(settings.inference_slots)
        self.registry = CollectorRegistry()
        self.requests = Counter("matvit_requests_total", "HTTP requests", ["endpoint", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("matvit_request_seconds", "HTTP request latency", ["endpoint"],
                                 registry=self.registry)
        self.queries = Counter("matvit_queries_total", "query images encoded", ["submodel"], registry=self.registry)
        self.encode_latency = Histogram("matvit_encode_seconds", "query encoding latency per request",
                                        ["submodel"], registry=self.registry)

    def load(self) -> None:
        try:
            encoder = Encoder.load(self.settings.checkpoint, cache_size=self.settings.encoder_cache)
            self.retriever = Retriever(self.settings.index, encoder=encoder, max_pixels=self.settings.max_pixels)
        except (UserError, OSError) as e:
            self.load_error = str(e)

    def ready(self) -> Retriever:
        if self.retriever is None:
            raise ApiError(503, "not_ready", self.load_error or "the model and index are still loading")
        return self.retriever

    def search(self, sources: list[bytes], options: SearchOptions) -> list[SearchResponse]:
        retriever = self.ready()
        budget = Budget(ms=options.budget_ms, gflops=options.budget_gflops)
        with self.slots:
            results = retriever.search(sources, k=options.k, submodel=options.submodel, budget=budget)
        spec = results[0].submodel.spec
        self.queries.labels(spec).inc(len(sources))
        self.encode_latency.labels(spec).observe(results[0].timings_ms["encode"] * len(sources) / 1e3)
        return [SearchResponse(results=r.neighbours, submodel=SubmodelUsed(id=r.submodel.id, spec=spec,
                                                                           gflops=r.submodel.gflops),
                               timings_ms=Timings(**r.timings_ms)) for r in results]

    def search_embedding(self, embedding: list[float], k: int) -> SearchResponse:
        retriever = self.ready()
        dim = retriever.index.manifest["dim"]
        if len(embedding) != dim:
            raise ApiError(400, "bad_embedding", f"the embedding has {len(embedding)} values; the index needs {dim}")
        start = time.perf_counter()
        hits = retriever.search_embeddings([embedding], k)[0]
        ms = (time.perf_counter() - start) * 1e3
        return SearchResponse(results=hits, timings_ms=Timings(decode=0, encode=0, search=ms, total=ms))


def require_key(request: Request) -> None:
    """The API key check (X-API-Key or a bearer token), when the server has a key."""
    expected = request.app.state.service.settings.api_key
    if expected is None:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:]
    if given != expected:
        raise ApiError(401, "unauthorized", "missing or wrong API key (send it as X-API-Key)")


Protected = Annotated[None, Depends(require_key)]
ItemId = Annotated[int, PathParam(ge=0, le=2**63 - 1, description="a gallery item's id", examples=[0])]


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "bad_base64", "image_b64 is not valid base64") from e


def create_app(settings: Settings, load_in_background: bool = True) -> FastAPI:
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.inference_slots))
        if load_in_background:
            threading.Thread(target=service.load, daemon=True).start()
        else:
            service.load()
        yield

    app = FastAPI(
        title="matvit", version="0.1.0", lifespan=lifespan,
        description="Adaptive image retrieval: a gallery indexed once with MatViT's XL encoder, queried with "
                    "whichever nested submodel fits the budget.",
    )
    app.state.service = service

    def error(status: int, code: str, message: str) -> JSONResponse:
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(422, "validation_error", f"{where}: {first['msg']}" if where else first["msg"])

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(exc.status_code, code, str(exc.detail))

    @app.middleware("http")
    async def metrics(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = route.path if route is not None else "unmatched"
        service.latency.labels(endpoint).observe(time.perf_counter() - start)
        service.requests.labels(endpoint, request.method, str(response.status_code)).inc()
        return response

    async def read_upload(upload: Any) -> bytes:
        if not hasattr(upload, "read"):
            raise ApiError(422, "validation_error", "file: expected an uploaded file")
        content = await upload.read(settings.max_upload_bytes + 1)
        if len(content) > settings.max_upload_bytes:
            raise ApiError(413, "too_large", f"upload over the limit of {settings.max_upload_bytes:,} bytes")
        return content

    def check_images(images: list[bytes]) -> None:
        for content in images:
            if len(content) > settings.max_upload_bytes:
                raise ApiError(413, "too_large", f"image over the limit of {settings.max_upload_bytes:,} bytes")
        if len(images) > settings.max_batch:
            raise ApiError(413, "too_many", f"{len(images)} images in one request; the limit is {settings.max_batch}")

    async def run_search(images: list[bytes], options: SearchOptions) -> list[SearchResponse]:
        check_images(images)
        try:
            return await run_in_threadpool(service.search, images, options)
        except ImageTooLarge as e:
            raise ApiError(413, "too_many_pixels", str(e)) from e
        except ImageError as e:
            raise ApiError(415, "not_an_image", str(e)) from e
        except (BudgetError, UserError) as e:
            raise ApiError(400, "bad_request", str(e)) from e

    async def parse(request: Request, model: type[BaseModel], file_field: str) -> tuple[BaseModel, list[bytes]]:
        """Multipart form (files) or JSON body, validated by the same pydantic model."""
        content_type = request.headers.get("content-type", "")
        length = int(request.headers.get("content-length") or 0)
        if length > settings.max_upload_bytes * max(1, settings.max_batch if file_field == "files" else 1):
            raise ApiError(413, "too_large", f"request body of {length:,} bytes is over the limit")
        try:
            if content_type.startswith("multipart/form-data"):
                form = await request.form()
                fields = {k: v for k, v in form.items() if k not in ("file", "files") and isinstance(v, str)}
                uploads = form.getlist(file_field)
                if not uploads:
                    raise ApiError(422, "validation_error", f"{file_field}: field required")
                options = SearchOptions.model_validate(fields)
                return options, [await read_upload(u) for u in uploads]
            if content_type.startswith("application/json"):
                try:
                    body = await request.json()
                except ValueError as e:
                    raise ApiError(400, "bad_json", "the request body is not valid JSON") from e
                return model.model_validate(body), []
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from e
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data or application/json")

    # --- endpoints --------------------------------------------------------------------------
    @app.get("/healthz", tags=["health"], summary="The process is alive")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Model and index are loaded (503 until then)",
             responses={503: {"model": ErrorBody}})
    def readyz() -> dict:
        service.ready()
        return {"status": "ready"}

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=PlainTextResponse)
    def metrics_text() -> Response:
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/index", tags=["index"], summary="What the index holds", response_model=IndexInfo,
             responses=ERRORS)
    def index_info(_: Protected) -> IndexInfo:
        m = service.ready().index.manifest
        return IndexInfo(count=m["count"], dimension=m["dim"], index_key=m["index_key"],
                         model_fingerprint=m["fingerprint"], submodel=m["submodel"])

    @app.get("/v1/submodels", tags=["index"], response_model=list[SubmodelRow], responses=ERRORS,
             summary="Named and profiled submodels with their cost on this server")
    def submodels(_: Protected) -> list[SubmodelRow]:
        retriever = service.ready()
        rows = {r["spec"]: r for r in retriever.profile_rows()}
        for spec in retriever.encoder.named():
            rows.setdefault(spec.text, {"spec": spec.text})
        out = []
        for text, row in rows.items():
            spec = retriever.encoder.spec(text)
            out.append(SubmodelRow(**{**row, "id": spec.id, "spec": spec.text,
                                      "params": retriever.encoder.params(spec),
                                      "gflops": retriever.encoder.gflops(spec)}))
        return out

    @app.post("/v1/search", tags=["search"], response_model=SearchResponse, responses=ERRORS,
              openapi_extra=MULTIPART_DOC, summary="Nearest gallery items of one query image or embedding")
    async def search(request: Request, _: Protected) -> SearchResponse:
        options, images = await parse(request, SearchJson, "file")
        if isinstance(options, SearchJson):
            if options.embedding is not None:
                service.ready()
                return await run_in_threadpool(service.search_embedding, options.embedding, options.k)
            images = [_b64(options.image_b64)]
        return (await run_search(images, options))[0]

    @app.post("/v1/search/batch", tags=["search"], response_model=BatchResponse, responses=ERRORS,
              openapi_extra=BATCH_DOC, summary="Several query images in one request, one result list each")
    async def search_batch(request: Request, _: Protected) -> BatchResponse:
        options, images = await parse(request, BatchJson, "files")
        if isinstance(options, BatchJson):
            images = [_b64(text) for text in options.images_b64]
        return BatchResponse(responses=await run_search(images, options))

    def item_or_404(item_id: int) -> dict:
        item = service.ready().index.item(item_id)
        if item is None:
            raise ApiError(404, "not_found", f"no item with id {item_id} in the index")
        return item

    @app.get("/v1/items/{item_id}", tags=["items"], summary="Metadata of a gallery item", responses=ERRORS)
    def item(item_id: ItemId, _: Protected) -> dict:
        return item_or_404(item_id)

    @app.get("/v1/items/{item_id}/image", tags=["items"], responses={**ERRORS, 200: {"content": {"image/*": {}}}},
             summary="The gallery image's bytes (only from the path the index recorded)")
    def item_image(item_id: ItemId, _: Protected) -> Response:
        source = item_or_404(item_id)["source"]
        pixels = data.source_image(source)
        if pixels is not None:
            buffer = io.BytesIO()
            Image.fromarray(pixels.permute(1, 2, 0).squeeze(-1).numpy()).save(buffer, format="PNG")
            return Response(buffer.getvalue(), media_type="image/png")
        path = Path(source)
        if not path.is_file():
            raise ApiError(404, "not_found", f"the image file of item {item_id} is no longer at its recorded path")
        return Response(path.read_bytes(), media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    return app
