"""What the index holds, and the submodels a query can use with their cost on this server."""

from __future__ import annotations

from fastapi import APIRouter

from ..schemas import ERRORS, IndexInfo, SubmodelRow
from ..service import Protected, Ready

router = APIRouter(tags=["index"])


@router.get("/v1/index", summary="What the index holds", response_model=IndexInfo, responses=ERRORS)
def index_info(_: Protected, retriever: Ready) -> IndexInfo:
    index = retriever.index
    m = index.manifest
    return IndexInfo(count=index.count, dimension=m["dim"], index_key=m["index_key"],
                     model_fingerprint=m["fingerprint"], submodel=m["submodel"], version=index.version)


@router.get("/v1/submodels", response_model=list[SubmodelRow], responses=ERRORS,
            summary="Named and profiled submodels with their cost on this server")
def submodels(_: Protected, retriever: Ready) -> list[SubmodelRow]:
    encoder = retriever.encoder
    return [SubmodelRow(**{**row, "id": encoder.spec(row["spec"]).id, "backend": encoder.serving(row["spec"])})
            for row in retriever.cost_rows(named=True)]
