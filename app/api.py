"""The REST API (FastAPI). It validates requests and calls `retrieval.Retriever`; it holds no model or index logic.

Errors are JSON `{"error": {"code", "message", "request_id"}}`: user input never causes a 500, and an
unexpected failure is a JSON 500 whose traceback is logged once. Every response carries `X-Request-ID`.
Limits live in `Settings`; a request body is refused (413) as soon as it passes its route's byte limit,
whatever its content type or transfer encoding. Inference and index writes run in worker threads,
never on the event loop; concurrent queries for one submodel are encoded as one batch (`retrieval.batching`),
at most `inference_slots` batches at a time (writes take no slot).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import faiss
import torch
from fastapi import Depends, FastAPI, Request, Security, UploadFile
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    FiniteFloat,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from starlette.datastructures import FormData, Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from matvit.errors import UserError, redact
from matvit.images import MAX_DECODE_BYTES, MAX_PIXELS, DecodeTooLarge, ImageError, ImageTooLarge
from retrieval.budget import Budget
from retrieval.encoder import Encoder
from retrieval.retriever import EmbeddingError, Retriever
from retrieval.store import DiskFull, IndexBusy, IndexCorrupt, IndexMissing, ItemImageRefused, ItemNotFound, open_store

log = logging.getLogger(__name__)

PART_HEADER_BYTES = 1024  # a multipart part's boundary and headers
OTHER_FIELDS_BYTES = 64 * 1024  # the fields of a body besides its images (options, an embedding)


@dataclass
class Settings:
    """Everything an operator sets, including every limit a request is held to."""

    index: str | Path  # an index directory or `milvus:URI` (see `retrieval.store.open_store`)
    checkpoint: Path
    api_key: str | None = None
    metrics_need_key: bool = False  # /metrics behind the API key too (health endpoints always stay open)
    max_upload_bytes: int = 10 * 1024 * 1024  # one image file in a request
    max_pixels: int = MAX_PIXELS  # one image, from its header, before decoding
    max_decode_bytes: int = MAX_DECODE_BYTES  # what decoding one image may hold (`matvit.images.decode_cost`: its
    # pixels times 1-4 bytes by mode, twice with alpha; JPEG at reduced scale), from its header, before decoding
    decode_slots: int = 4  # images decoding at once: decoding holds at most decode_slots * max_decode_bytes
    max_batch: int = 32  # images in a batch search or an item add
    max_field_bytes: int = 4096  # a text field of a multipart form (an option, a label, a name)
    max_item_image_bytes: int = 32 * 1024 * 1024  # a gallery image file the server sends back
    inference_slots: int = 2  # query batches encoding at once; torch gets cores / slots threads each
    batch_wait_ms: float = 2.0  # how long a query batch waits for requests still decoding to join it (it stops
    # waiting once it holds max_batch images)
    encoder_cache: int = 8
    backend: str = "eager"  # the query encoder's backend: eager, compile, onnx, onnx-int8, or auto (the fastest
    # that matches eager, per submodel, measured with the profile at start)
    write_wait: float = 30.0  # seconds an add or delete waits for another writer of the index before 409
    index_poll_seconds: float = 1.0  # while not ready: how often the server looks for a new index version

    def images_per_request(self, path: str) -> int:
        """How many image files a request to `path` may carry."""
        return {"/v1/search": 1, "/v1/search/batch": self.max_batch, "/v1/items": self.max_batch}.get(path, 0)

    def body_limit(self, path: str) -> int:
        """Bytes a request body to `path` may hold: its images base64-encoded (JSON is the larger form), a
        label and a name per image, part headers, and the other fields."""
        per_image = -(-self.max_upload_bytes * 4 // 3) + 2 * self.max_field_bytes + PART_HEADER_BYTES
        return self.images_per_request(path) * per_image + OTHER_FIELDS_BYTES


class ApiError(HTTPException):
    """An error answered as `{"error": {"code", "message", "request_id"}}`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, message)
        self.code = code


USER_ERRORS: list[tuple[type[UserError], int, str]] = [  # first match wins: subclasses before their bases
    (DiskFull, 507, "disk_full"),
    (IndexBusy, 409, "index_busy"), (ItemNotFound, 404, "not_found"), (ItemImageRefused, 403, "image_refused"),
    (IndexCorrupt, 503, "index_corrupt"), (IndexMissing, 503, "no_index"), (EmbeddingError, 422, "bad_embedding"),
    (DecodeTooLarge, 413, "decode_too_large"), (ImageTooLarge, 413, "too_many_pixels"),
    (ImageError, 415, "not_an_image"), (UserError, 400, "bad_request")]
HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
CLIENT_GONE = 499  # counted in /metrics for a request whose client disconnected before its body was read (nginx's)
REQUEST_ID = re.compile(r"[!-~]{1,128}")  # printable ASCII, no spaces


def error_response(scope: Scope, status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    request_id = scope.get("state", {}).get("request_id")
    return JSONResponse({"error": {"code": code, "message": message, "request_id": request_id}}, status,
                        headers=headers)


# --- request models ------------------------------------------------------------------------------
def _from_base64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("expected a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError("not valid base64") from e


Base64File = Annotated[bytes, BeforeValidator(_from_base64),
                       WithJsonSchema({"type": "string", "contentEncoding": "base64"})]
Text = Annotated[Annotated[str, Field(max_length=256)] | None, BeforeValidator(lambda v: v or None)]  # "": none


class SearchOptions(BaseModel):
    """How to search: how many neighbours, and at most one way to pick the query submodel."""

    k: int = Field(10, ge=1, le=1000, description="neighbours to return")
    submodel: str | None = Field(None, max_length=256, description="spec text, e.g. `S` or `S,S,M,M,L,XL`",
                                 examples=["S"])
    budget_ms: float | None = Field(None, gt=0, description="latency budget at batch 1 on this server")
    budget_gflops: float | None = Field(None, gt=0, description="forward GFLOPs budget per image")
    nprobe: int | None = Field(None, ge=1, le=1_000_000, description="IVF lists to visit (default: tuned at build)")
    ef_search: int | None = Field(None, ge=1, le=100_000, description="HNSW search breadth (default: tuned)")
    rerank: int | None = Field(None, ge=1, le=1000, description="IVF with PQ/SQ codes: re-rank this many times k "
                                                                "candidates by their stored vectors (default: tuned)")
    mode: Literal["single", "cascade"] = Field("single", description="`cascade`: encode with the calibrated chain's "
                                                                     "smallest submodel first and escalate to larger "
                                                                     "ones while the result is unsure (calibrated with "
                                                                     "`matvit cascade`)")

    @model_validator(mode="after")
    def one_choice(self) -> SearchOptions:
        choices = sum(v is not None for v in (self.submodel, self.budget_ms, self.budget_gflops))
        if choices + (self.mode == "cascade") > 1:
            raise ValueError("give at most one of submodel, budget_ms, budget_gflops, mode=cascade")
        return self

    def search_params(self) -> dict:
        """The index search parameters given (the index's tuned values for the others)."""
        return {name: value for name in ("nprobe", "ef_search", "rerank") if (value := getattr(self, name)) is not None}


class SearchForm(SearchOptions):
    """A multipart query: one image file (several go to /v1/search/batch)."""

    file: UploadFile = Field(description="the query image")

    def uploads(self) -> list:
        return [self.file]


class SearchJson(SearchOptions):
    """A JSON query: a base64-encoded image, or a ready-made embedding."""

    image_b64: Base64File | None = Field(None, description="the query image's file bytes, base64-encoded")
    embedding: list[FiniteFloat] | None = Field(None, description="a query embedding of the index's dimension")

    @model_validator(mode="after")
    def one_query(self) -> SearchJson:
        if (self.image_b64 is None) == (self.embedding is None):
            raise ValueError("give exactly one of image_b64 or embedding")
        return self

    def uploads(self) -> list:
        return [] if self.image_b64 is None else [self.image_b64]

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"image_b64": "iVBORw0KGgo...", "k": 5, "submodel": "S"}, {"embedding": [0.1, 0.0, 0.3], "k": 3}]})


class BatchForm(SearchOptions):
    files: list[UploadFile] = Field(min_length=1, description="the query images")

    def uploads(self) -> list:
        return self.files


class BatchJson(SearchOptions):
    images_b64: list[Base64File] = Field(min_length=1, description="base64-encoded image files")

    def uploads(self) -> list:
        return self.images_b64


class ItemFields(BaseModel):
    """Optional class names and display names of new gallery items, one per image when given."""

    labels: list[Text] | None = Field(None, description="class name per image (new names add classes)")
    names: list[Text] | None = Field(None, description="display name (`source`) per image: a label only, "
                                     "never read as a path (the image served is the upload)")

    @model_validator(mode="after")
    def one_per_image(self) -> ItemFields:
        count = len(self.uploads())
        for field, values in (("labels", self.labels), ("names", self.names)):
            if values is not None and len(values) != count:
                raise ValueError(f"{count} images need {count} {field}, got {len(values)}")
        return self

    def uploads(self) -> list:
        raise NotImplementedError


class ItemsForm(ItemFields):
    files: list[UploadFile] = Field(min_length=1, description="the images to add")

    def uploads(self) -> list:
        return self.files


class ItemsJson(ItemFields):
    images_b64: list[Base64File] = Field(min_length=1, description="base64-encoded image files to add")

    def uploads(self) -> list:
        return self.images_b64


def request_body(json_model: type[BaseModel], form_model: type[BaseModel]) -> dict:
    """The OpenAPI request body of a route taking JSON or a multipart form, from the models that validate them."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": json_model.model_json_schema()},
        "multipart/form-data": {"schema": form_model.model_json_schema()}}}}


def _is_list(annotation: Any) -> bool:
    return get_origin(annotation) is list or any(get_origin(a) is list for a in get_args(annotation))


def form_values(form: FormData, model: type[BaseModel]) -> dict:
    """The form's values for `model`: every value of a list field, else the one value (several values of a
    single field stay a list, for validation to refuse)."""
    values = {}
    for name, field in model.model_fields.items():
        given = form.getlist(name)
        if given:
            values[name] = given if _is_list(field.annotation) or len(given) > 1 else given[0]
    return values


# --- response models -----------------------------------------------------------------------------
class Item(BaseModel):
    """A gallery item's metadata; `source` names it relative to its indexed root, never as a server path."""

    model_config = ConfigDict(extra="allow")
    id: int
    source: str
    label: int | None = None
    label_name: str | None = None
    width: int | None = None
    height: int | None = None
    added_at: str | None = None


class Neighbour(BaseModel):
    rank: int
    id: int
    score: float
    label: str | None
    metadata: Item


class SubmodelUsed(BaseModel):
    id: str
    spec: str
    gflops: float
    backend: str | None = Field(None, description="the backend that encoded the query (eager, compile, onnx, "
                                                  "onnx-int8)")


class CascadeUsed(BaseModel):
    ran: list[str] = Field(description="the submodels that encoded the query, in order")
    gflops: float = Field(description="their forward GFLOPs together")
    confidence: float = Field(description="the last stage's confidence (share of neighbours agreeing, or margin)")


class Timings(BaseModel):
    """Per query image, in milliseconds: `queue` is the wait for its batch to be encoded, `encode` that batch's,
    `search` the index's, `metadata` the lookup of the neighbours' items."""

    decode: float
    queue: float = 0.0
    encode: float
    search: float
    metadata: float = 0.0
    total: float


class SearchResponse(BaseModel):
    results: list[Neighbour]
    submodel: SubmodelUsed | None = Field(None, description="None for embedding queries")
    timings_ms: Timings
    encode_batch: int = Field(1, description="query images encoded in one batch with this one (micro-batching)")
    cascade: CascadeUsed | None = Field(None, description="with mode=cascade: what ran")

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "results": [{"rank": 1, "id": 5012, "score": 0.97, "label": "ankle-boot",
                     "metadata": {"id": 5012, "source": "fashion-mnist:train:5012", "label": 9, "width": 28,
                                  "height": 28, "added_at": "2026-11-22T11:26:00+00:00", "label_name": "ankle-boot"}}],
        "submodel": {"id": "S", "spec": "S", "gflops": 0.0178, "backend": "onnx"},
        "timings_ms": {"decode": 0.5, "queue": 0.4, "encode": 3.6, "search": 0.1, "metadata": 0.2, "total": 4.8},
        "encode_batch": 3}]})


class BatchResponse(BaseModel):
    responses: list[SearchResponse]


class ItemsAdded(BaseModel):
    items: list[Item]


class ItemsDeleted(BaseModel):
    deleted: list[int]


class IndexInfo(BaseModel):
    count: int
    dimension: int
    index_key: str
    model_fingerprint: str
    submodel: str
    version: str

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "count": 60000, "dimension": 128, "index_key": "Flat", "model_fingerprint": "3f1c0a9b2d4e5f60",
        "submodel": "XL", "version": "v000003"}]})


class BackendTrial(BaseModel):
    """A backend tried on a submodel when the profile was measured."""

    backend: str
    passed: bool = Field(description="its probe embeddings matched eager's (cosine at least 0.999 on every row)")
    cosine: float | None = Field(None, description="the worst probe row's cosine against eager")
    latency_ms_b1: float | None = None
    error: str | None = Field(None, description="why it could not run here")


class SubmodelRow(BaseModel):
    id: str
    spec: str
    params: int
    gflops: float
    backend: str = Field(description="the backend serving this submodel; the latencies are its own")
    latency_ms_b1: float | None = None
    latency_ms_b32: float | None = None
    knn1: float | None = None
    backends: list[BackendTrial] | None = Field(None, description="every backend tried when profiling")

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "S-S-M-M-L-XL", "spec": "S,S,M,M,L,XL", "params": 706442, "gflops": 0.0245, "backend": "onnx",
        "latency_ms_b1": 2.9, "latency_ms_b32": 21.4, "knn1": 0.851,
        "backends": [{"backend": "eager", "passed": True, "cosine": 1.0, "latency_ms_b1": 3.4},
                     {"backend": "onnx", "passed": True, "cosine": 0.999998, "latency_ms_b1": 2.9}]}]})


class ErrorDetail(BaseModel):
    code: str
    message: str
    request_id: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "error": {"code": "bad_request", "message": "unknown granularity 'XXL' in submodel spec; allowed: S, M, L, XL",
                  "request_id": "5f0c3a8e9b1d4c2a8e7f6a5b4c3d2e1f"}}]})


ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 403, 404, 409, 413, 415, 422, 500, 503)}


# --- the service ---------------------------------------------------------------------------------
class Service:
    """The loaded retriever, its readiness, the inference gate and the metrics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.retriever: Retriever | None = None
        self.encoder: Encoder | None = None
        self.tried: str | None = None  # the index version the last load tried
        self.load_error: str | None = None
        self.registry = CollectorRegistry()
        self.requests = Counter("matvit_requests_total", "HTTP requests", ["endpoint", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("matvit_request_seconds", "HTTP request latency", ["endpoint"],
                                 registry=self.registry)
        self.queries = Counter("matvit_queries_total", "query images encoded, by granularity (else mixnmatch)",
                               ["submodel"], registry=self.registry)
        self.encode_latency = Histogram("matvit_encode_seconds", "query encoding latency per request",
                                        ["submodel"], registry=self.registry)
        self.encode_batch = Histogram("matvit_encode_batch_images", "images in the batch a query was encoded in",
                                      ["submodel"], buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)

    def load(self) -> bool:
        """Open the checkpoint and index, then measure the submodels' cost here unless a profile exists
        (so no request ever profiles); ready only when all are done. False, with the reason logged once and
        kept for /readyz, when the checkpoint or the index cannot be used (yet)."""
        try:
            if self.encoder is None:
                self.encoder = Encoder.load(self.settings.checkpoint, cache_size=self.settings.encoder_cache,
                                            backend=self.settings.backend)
            store = open_store(self.settings.index)
            self.tried = store.current_version()
            retriever = Retriever(store, encoder=self.encoder, max_pixels=self.settings.max_pixels,
                                  max_decode_bytes=self.settings.max_decode_bytes,
                                  decode_slots=self.settings.decode_slots, encode_slots=self.settings.inference_slots,
                                  batch_wait_ms=self.settings.batch_wait_ms, max_batch=self.settings.max_batch)
            retriever.ensure_profile()
        except IndexMissing:
            self._not_ready("no index yet: waiting for one to be built (`matvit build-index`)")
            return False
        except (UserError, OSError) as e:
            self._not_ready(str(e))
            return False
        self.retriever, self.load_error = retriever, None
        log.info("ready: serving index version %s (%d items)", retriever.index.version, retriever.index.count)
        return True

    def _not_ready(self, reason: str) -> None:
        if reason != self.load_error:
            log.error("not ready: %s", reason)
        self.load_error = reason

    def keep_loading(self, stop: threading.Event) -> None:
        """Until ready (or `stop`): load again whenever the index's version changes. A server started before
        its index exists becomes ready once it is built; one whose index is corrupt, or was built with another
        checkpoint, once a new version is written. A checkpoint it cannot read keeps it unready."""
        while self.retriever is None and self.encoder is not None and not stop.wait(self.settings.index_poll_seconds):
            try:
                version = open_store(self.settings.index).current_version()
            except UserError:
                continue
            if version != self.tried:
                self.load()

    def ready(self) -> Retriever:
        if self.retriever is None:
            raise ApiError(503, "not_ready", self.public(self.load_error or "the model and index are still loading"))
        return self.retriever

    def public(self, message: str) -> str:
        """`message` without the server's own paths (see `matvit.errors.redact`)."""
        places = {self.settings.index: "<index>", self.settings.checkpoint: "<checkpoint>"}
        if self.retriever is not None:
            places[self.retriever.store.files] = "<index>"
        return redact(message, places)

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        """Count a finished request (labels from a bounded set: route templates, known methods)."""
        route = scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        method = scope.get("method", "")
        self.latency.labels(endpoint).observe(seconds)
        self.requests.labels(endpoint, method if method in METHODS else "other", str(status)).inc()

    def search(self, images: list[bytes], options: SearchOptions) -> list[SearchResponse]:
        retriever = self.ready()
        budget = Budget(ms=options.budget_ms, gflops=options.budget_gflops)
        if options.mode == "cascade":
            results = retriever.search_cascade(images, k=options.k, search_params=options.search_params())
        else:
            results = retriever.search(images, k=options.k, submodel=options.submodel, budget=budget,
                                       search_params=options.search_params())
        named = {s.text for s in retriever.encoder.named()}
        labels = [r.submodel.spec if r.submodel.spec in named else "mixnmatch" for r in results]
        for label in labels:  # with the cascade, each query counts under the submodel it stopped at
            self.queries.labels(label).inc()
        self.encode_latency.labels(labels[0]).observe(results[0].timings_ms["encode"] * len(images) / 1e3)
        self.encode_batch.labels(labels[0]).observe(results[0].encode_batch)
        return [SearchResponse(results=r.neighbours, submodel=SubmodelUsed(
                    id=r.submodel.id, spec=r.submodel.spec, gflops=r.submodel.gflops, backend=r.submodel.backend),
                    timings_ms=Timings(**r.timings_ms), encode_batch=r.encode_batch, cascade=r.cascade)
                for r in results]

    def search_embedding(self, embedding: list[float], k: int, search_params: dict) -> SearchResponse:
        retriever = self.ready()
        index = retriever.index
        dim = index.manifest["dim"]
        if len(embedding) != dim:
            raise ApiError(400, "bad_embedding", f"the embedding has {len(embedding)} values; the index needs {dim}")
        start = time.perf_counter()
        scores, ids = retriever.nearest([embedding], k, search_params, index)
        found = time.perf_counter()
        hits = retriever.hits(index, scores, ids)[0]
        search, metadata = (found - start) * 1e3, (time.perf_counter() - found) * 1e3
        return SearchResponse(results=hits, timings_ms=Timings(decode=0, encode=0, search=search, metadata=metadata,
                                                               total=search + metadata))


# --- ASGI layers ---------------------------------------------------------------------------------
class RequestContext:
    """The outermost layer: gives each request an id (the client's `X-Request-ID` when sane), sent back on
    every response; turns an unexpected exception into a JSON 500 and logs its traceback once; counts requests
    (one whose client disconnected mid-body as 499, without a traceback)."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id")
        request_id = given if given and REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status: int | None = None
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:  # the client left before sending its whole body: nobody to answer
            log.info("request %s (%s %s): the client disconnected", request_id, scope.get("method"), scope.get("path"))
            status = status or CLIENT_GONE
        except Exception:
            log.exception("request %s (%s %s) failed", request_id, scope.get("method"), scope.get("path"))
            if status is None:
                response = error_response(scope, 500, "internal", f"internal server error (request id {request_id})")
                await response(scope, receive, send_with_id)
        finally:
            self.service.observe(scope, status or 500, time.perf_counter() - start)


class BodyLimit:
    """Refuses (413) a request body over its route's `Settings.body_limit` as it arrives, declared or
    chunked, before anything parses it: reading it raises once the count passes the limit."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.settings.body_limit(scope["path"])
        declared = Headers(scope=scope).get("content-length", "")
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            if not (declared.isdigit() and int(declared) > limit):
                message = await receive()
                received += len(message.get("body", b""))
                if received <= limit:
                    return message
            raise ApiError(413, "too_large", f"request body over the limit of {limit:,} bytes for {scope['path']}")

        await self.app(scope, receive_limited, send)


# --- authentication ------------------------------------------------------------------------------
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the server's API key")
bearer = HTTPBearer(auto_error=False, description="the server's API key as a bearer token")


def require_key(request: Request, key: Annotated[str | None, Security(api_key_header)],
                token: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> None:
    """The API key check (X-API-Key or a bearer token), when the server has a key."""
    expected = request.app.state.service.settings.api_key
    if expected is None:
        return
    given = key if key is not None else token.credentials if token is not None else ""
    if not hmac.compare_digest(given.encode("latin-1"), expected.encode()):  # header text is latin-1 decoded
        raise ApiError(401, "unauthorized", "missing or wrong API key (send it as X-API-Key)")


Protected = Annotated[None, Depends(require_key)]
ItemId = Annotated[int, PathParam(ge=0, le=2**63 - 1, description="a gallery item's id", examples=[0])]


# --- the application -----------------------------------------------------------------------------
def create_app(settings: Settings, load_in_background: bool = True) -> FastAPI:
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threads = max(1, (os.cpu_count() or 1) // settings.inference_slots)
        torch.set_num_threads(threads)  # one share of the cores per encode slot, and as many for a
        faiss.omp_set_num_threads(threads)  # search, so concurrent queries never oversubscribe the cores
        stop = threading.Event()
        if load_in_background:
            threading.Thread(target=lambda: service.load() or service.keep_loading(stop), daemon=True).start()
        elif not service.load():
            threading.Thread(target=service.keep_loading, args=(stop,), daemon=True).start()
        yield
        stop.set()

    app = FastAPI(
        title="matvit", version="0.1.0", lifespan=lifespan,
        description="Adaptive image retrieval: a gallery indexed once with MatViT's XL encoder, queried with "
                    "whichever nested submodel fits the budget.",
    )
    app.state.service = service
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(RequestContext, service=service)  # added last: the outermost

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        code = exc.code if isinstance(exc, ApiError) else HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(request.scope, exc.status_code, code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(request.scope, 422, "validation_error", f"{where}: {first['msg']}" if where
                              else first["msg"])

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):
        status, code = next((s, c) for kind, s, c in USER_ERRORS if isinstance(exc, kind))
        return error_response(request.scope, status, code, service.public(str(exc)))

    async def open_form(request: Request) -> FormData:
        """The multipart form, refused past the route's file count before the extra files are read."""
        allowed = settings.images_per_request(request.url.path)
        try:
            return await request.form(max_files=allowed, max_fields=2 * allowed + 8,
                                      max_part_size=settings.max_field_bytes)
        except ApiError:
            raise  # the body limit
        except HTTPException as e:  # Starlette's answer to a malformed form or one with too many parts
            if str(e.detail).startswith("Part exceeded maximum size"):
                raise ApiError(413, "too_large", f"a form field over the limit of {settings.max_field_bytes:,} "
                                                 "bytes") from e
            if not str(e.detail).startswith("Too many files"):
                raise ApiError(400, "bad_form", str(e.detail)) from e
            if request.url.path == "/v1/search":
                raise ApiError(422, "validation_error", "file: one query image per search; send several as "
                                                        "`files` to /v1/search/batch") from e
            raise ApiError(413, "too_many", f"more than {allowed} files in one request") from e

    def check_images(request: Request, images: list[bytes]) -> list[bytes]:
        """The one check of image files against the limits: how many, and how large each."""
        allowed = settings.images_per_request(request.url.path)
        if len(images) > allowed:
            raise ApiError(413, "too_many", f"{len(images)} images in one request; the limit is {allowed}")
        for content in images:
            if len(content) > settings.max_upload_bytes:
                raise ApiError(413, "too_large", f"image over the limit of {settings.max_upload_bytes:,} bytes")
        return images

    async def parse_body(request: Request, json_model: type[BaseModel],
                         form_model: type[BaseModel]) -> tuple[Any, list[bytes]]:
        """The body validated by `json_model` (JSON) or `form_model` (multipart), and its image files."""
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        try:
            if media == "application/json":
                body = json_model.model_validate_json(await request.body())
                return body, check_images(request, body.uploads())
            if media == "multipart/form-data":
                form = await open_form(request)
                try:
                    body = form_model.model_validate(form_values(form, form_model))
                    return body, check_images(request, [await upload.read() for upload in body.uploads()])
                finally:
                    await form.close()
        except ValidationError as e:
            if any(err["type"] == "json_invalid" for err in e.errors()):
                raise ApiError(400, "bad_json", "the request body is not valid JSON") from e
            raise RequestValidationError(e.errors()) from e
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data or application/json")

    # --- endpoints --------------------------------------------------------------------------
    @app.get("/healthz", tags=["health"], summary="The process is alive")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Model, index and cost profile are loaded (503 until then)",
             responses={503: {"model": ErrorBody}})
    def readyz() -> dict:
        service.ready()
        return {"status": "ready"}

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=PlainTextResponse,
             dependencies=[Depends(require_key)] if settings.metrics_need_key else None,
             responses={401: {"model": ErrorBody}} if settings.metrics_need_key else None)
    def metrics_text() -> Response:
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/index", tags=["index"], summary="What the index holds", response_model=IndexInfo,
             responses=ERRORS)
    def index_info(_: Protected) -> IndexInfo:
        index = service.ready().index
        m = index.manifest
        return IndexInfo(count=index.count, dimension=m["dim"], index_key=m["index_key"],
                         model_fingerprint=m["fingerprint"], submodel=m["submodel"], version=index.version)

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
                                      "gflops": retriever.encoder.gflops(spec),
                                      "backend": retriever.encoder.serving(spec)}))
        return out

    @app.post("/v1/search", tags=["search"], response_model=SearchResponse, responses=ERRORS,
              openapi_extra=request_body(SearchJson, SearchForm),
              summary="Nearest gallery items of one query image or embedding")
    async def search(request: Request, _: Protected) -> SearchResponse:
        service.ready()
        body, images = await parse_body(request, SearchJson, SearchForm)
        if getattr(body, "embedding", None) is not None:
            return await run_in_threadpool(service.search_embedding, body.embedding, body.k, body.search_params())
        return (await run_in_threadpool(service.search, images, body))[0]

    @app.post("/v1/search/batch", tags=["search"], response_model=BatchResponse, responses=ERRORS,
              openapi_extra=request_body(BatchJson, BatchForm),
              summary="Several query images in one request, one result list each")
    async def search_batch(request: Request, _: Protected) -> BatchResponse:
        service.ready()
        body, images = await parse_body(request, BatchJson, BatchForm)
        return BatchResponse(responses=await run_in_threadpool(service.search, images, body))

    @app.post("/v1/items", tags=["items"], status_code=201, response_model=ItemsAdded, responses=ERRORS,
              openapi_extra=request_body(ItemsJson, ItemsForm),
              summary="Add images to the gallery (embedded with the index's submodel; one new index version)")
    async def add_items(request: Request, _: Protected) -> ItemsAdded:
        retriever = service.ready()
        body, images = await parse_body(request, ItemsJson, ItemsForm)
        items = await run_in_threadpool(retriever.add, images, body.labels, body.names, settings.write_wait)
        return ItemsAdded(items=items)

    @app.get("/v1/items/{item_id}", tags=["items"], response_model=Item, summary="Metadata of a gallery item",
             responses=ERRORS)
    def item(item_id: ItemId, _: Protected) -> dict:
        found = service.ready().item(item_id)
        if found is None:
            raise ApiError(404, "not_found", f"no item with id {item_id} in the index")
        return found

    @app.delete("/v1/items/{item_id}", tags=["items"], response_model=ItemsDeleted, responses=ERRORS,
                summary="Remove a gallery item (one new index version; ids are never reused)")
    def delete_item(item_id: ItemId, _: Protected) -> ItemsDeleted:
        return ItemsDeleted(deleted=service.ready().remove([item_id], wait=settings.write_wait))

    @app.get("/v1/items/{item_id}/image", tags=["items"], responses={**ERRORS, 200: {"content": {"image/*": {}}}},
             summary="The gallery image's bytes (only a regular file under an indexed root, within the size limit)")
    def item_image(item_id: ItemId, _: Protected) -> Response:
        content, media_type = service.ready().item_image(item_id, settings.max_item_image_bytes)
        return Response(content, media_type=media_type)

    return app
