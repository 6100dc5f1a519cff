"""The request and response bodies (pydantic models): what each route accepts and answers, as the OpenAPI
schema shows them."""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args, get_origin

from fastapi import UploadFile
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, FiniteFloat, WithJsonSchema, model_validator
from starlette.datastructures import FormData

if TYPE_CHECKING:
    from retrieval.retriever import Result

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
    dims: int | None = Field(None, ge=1, le=65_536, description="search exactly on this prefix of the embedding "
                                                               "(one of the Matryoshka dims the model was trained "
                                                               "with; default: the full embedding)")
    funnel: int | None = Field(None, ge=1, le=65_536, description="shortlist with this prefix, then re-rank the "
                                                                  "shortlist by the full vectors")
    shortlist: int | None = Field(None, ge=1, le=100_000, description="the funnel's shortlist (default: the "
                                                                      "larger of 100 and 10 x k)")
    mode: Literal["single", "cascade"] = Field("single", description="`cascade`: encode with the calibrated chain's "
                                                                     "smallest submodel first and escalate to larger "
                                                                     "ones while the result is unsure (calibrated with "
                                                                     "`matvit cascade`)")

    @model_validator(mode="after")
    def one_choice(self) -> SearchOptions:
        choices = sum(v is not None for v in (self.submodel, self.budget_ms, self.budget_gflops))
        if choices + (self.mode == "cascade") > 1:
            raise ValueError("give at most one of submodel, budget_ms, budget_gflops, mode=cascade")
        if self.dims is not None and self.funnel is not None:
            raise ValueError("give either dims (exact search on a prefix) or funnel (a prefix's shortlist re-ranked by "
                             "the full vectors), not both")
        if self.shortlist is not None and self.funnel is None:
            raise ValueError("a shortlist is the funnel's: give funnel with it")
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


class SearchUsed(BaseModel):
    dims: int = Field(description="the prefix length searched (the embedding's length: full search)")
    funnel: bool = Field(description="whether the prefix's shortlist was re-ranked by the full vectors")
    shortlist: int | None = Field(None, description="the funnel's shortlist")


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
    search: SearchUsed | None = Field(None, description="the dimensions searched")
    timings_ms: Timings
    encode_batch: int = Field(1, description="query images encoded in one batch with this one (micro-batching)")
    cascade: CascadeUsed | None = Field(None, description="with mode=cascade: what ran")

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "results": [{"rank": 1, "id": 5012, "score": 0.97, "label": "ankle-boot",
                     "metadata": {"id": 5012, "source": "fashion-mnist:train:5012", "label": 9, "width": 28,
                                  "height": 28, "added_at": "2026-11-22T11:26:00+00:00", "label_name": "ankle-boot"}}],
        "submodel": {"id": "S", "spec": "S", "gflops": 0.0178, "backend": "onnx"},
        "search": {"dims": 128, "funnel": False, "shortlist": None},
        "timings_ms": {"decode": 0.5, "queue": 0.4, "encode": 3.6, "search": 0.1, "metadata": 0.2, "total": 4.8},
        "encode_batch": 3}]})

    @classmethod
    def of(cls, result: Result) -> SearchResponse:
        """The answer for one query image's `retrieval.retriever.Result`."""
        used = result.submodel
        return cls(results=result.neighbours, timings_ms=Timings(**result.timings_ms), encode_batch=result.encode_batch,
                   submodel=SubmodelUsed(id=used.id, spec=used.spec, gflops=used.gflops, backend=used.backend),
                   search=SearchUsed(**result.search.to_dict()), cascade=result.cascade)


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
