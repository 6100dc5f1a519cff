"""The service's state (the operator's `Settings`, the loaded `Retriever` with its decode and encode slots, the
metrics) and the FastAPI dependencies that hand it to the routes: the service, its settings, the ready
retriever (503 until loaded) and the API key check."""

from __future__ import annotations

import hmac
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import Scope

from matvit.errors import UserError, redact
from matvit.images import MAX_DECODE_BYTES, MAX_PIXELS
from retrieval.encoder import Encoder
from retrieval.retriever import Result, Retriever
from retrieval.store import IndexMissing, open_store

from .errors import ApiError

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


METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


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

    def count_queries(self, results: list[Result], images: int) -> None:
        """Count a search's query images by the submodel each stopped at (a named granularity, else mixnmatch),
        and its encode latency and batch."""
        named = {s.text for s in self.encoder.named()}
        labels = [r.submodel.spec if r.submodel.spec in named else "mixnmatch" for r in results]
        for label in labels:  # with the cascade, each query counts under the submodel it stopped at
            self.queries.labels(label).inc()
        self.encode_latency.labels(labels[0]).observe(results[0].timings_ms["encode"] * images / 1e3)
        self.encode_batch.labels(labels[0]).observe(results[0].encode_batch)


# --- dependencies --------------------------------------------------------------------------------
def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def get_settings(service: ServiceDep) -> Settings:
    return service.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def ready_retriever(service: ServiceDep) -> Retriever:
    """The loaded retriever; 503 `not_ready` until the model, index and cost profile are loaded."""
    return service.ready()


Ready = Annotated[Retriever, Depends(ready_retriever)]

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the server's API key")
bearer = HTTPBearer(auto_error=False, description="the server's API key as a bearer token")


def require_key(service: ServiceDep, key: Annotated[str | None, Security(api_key_header)],
                token: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> None:
    """The API key check (X-API-Key or a bearer token), when the server has a key."""
    expected = service.settings.api_key
    if expected is None:
        return
    given = key if key is not None else token.credentials if token is not None else ""
    if not hmac.compare_digest(given.encode("latin-1"), expected.encode()):  # header text is latin-1 decoded
        raise ApiError(401, "unauthorized", "missing or wrong API key (send it as X-API-Key)")


Protected = Annotated[None, Depends(require_key)]
