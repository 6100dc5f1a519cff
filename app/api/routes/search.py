"""Search: the nearest gallery items of one query (an image or an embedding) or of a batch of images.
Encoding and searching run in worker threads, never on the event loop."""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from retrieval.budget import Budget
from retrieval.prefix import Plan
from retrieval.retriever import Retriever

from ..bodies import BatchBody, SearchBody
from ..errors import ApiError
from ..schemas import (
    ERRORS,
    BatchForm,
    BatchJson,
    BatchResponse,
    SearchForm,
    SearchJson,
    SearchOptions,
    SearchResponse,
    SearchUsed,
    Timings,
    request_body,
)
from ..service import Protected, Ready, Service, ServiceDep

router = APIRouter(tags=["search"])


@router.post("/v1/search", response_model=SearchResponse, responses=ERRORS,
             openapi_extra=request_body(SearchJson, SearchForm),
             summary="Nearest gallery items of one query image or embedding")
async def search(_: Protected, service: ServiceDep, retriever: Ready, query: SearchBody) -> SearchResponse:
    body, images = query
    if getattr(body, "embedding", None) is not None:
        return await run_in_threadpool(search_embedding, retriever, body.embedding, body)
    return (await run_in_threadpool(search_images, service, retriever, images, body))[0]


@router.post("/v1/search/batch", response_model=BatchResponse, responses=ERRORS,
             openapi_extra=request_body(BatchJson, BatchForm),
             summary="Several query images in one request, one result list each")
async def search_batch(_: Protected, service: ServiceDep, retriever: Ready, query: BatchBody) -> BatchResponse:
    body, images = query
    return BatchResponse(responses=await run_in_threadpool(search_images, service, retriever, images, body))


def search_images(service: Service, retriever: Retriever, images: list[bytes],
                  options: SearchOptions) -> list[SearchResponse]:
    """One answer per query image, with the submodel, budget or cascade `options` name."""
    budget = Budget(ms=options.budget_ms, gflops=options.budget_gflops)
    plan = search_plan(retriever, options)
    if options.mode == "cascade":
        results = retriever.search_cascade(images, k=options.k, search_params=options.search_params(), plan=plan)
    else:
        results = retriever.search(images, k=options.k, submodel=options.submodel, budget=budget,
                                   search_params=options.search_params(), plan=plan)
    service.count_queries(results, len(images))
    return [SearchResponse.of(r) for r in results]


def search_plan(retriever: Retriever, options: SearchOptions) -> Plan | None:
    """The dimensions to search (`dims`, `funnel`, `shortlist`), checked against the model and the index; None when
    not given (full vectors, or the budget's choice)."""
    return retriever.search_plan(options.dims, options.funnel, options.k, options.shortlist)


def search_embedding(retriever: Retriever, embedding: list[float], options: SearchOptions) -> SearchResponse:
    """The answer for a ready-made embedding (`Retriever.search_embeddings`); its `search` time includes the
    neighbours' metadata."""
    index = retriever.index
    dim = index.manifest["dim"]
    if len(embedding) != dim:
        raise ApiError(400, "bad_embedding", f"the embedding has {len(embedding)} values; the index needs {dim}")
    plan = search_plan(retriever, options) or retriever.full_plan()
    start = time.perf_counter()
    hits = retriever.search_embeddings([embedding], options.k, options.search_params(), index, plan)[0]
    search = (time.perf_counter() - start) * 1e3
    return SearchResponse(results=hits, search=SearchUsed(**plan.to_dict()),
                          timings_ms=Timings(decode=0, encode=0, search=search, total=search))
