"""Gallery items: add images, read an item's metadata or image, remove an item. Each write makes one new
index version and runs in a worker thread."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from ..bodies import ItemsBody
from ..errors import ApiError
from ..schemas import ERRORS, Item, ItemsAdded, ItemsDeleted, ItemsForm, ItemsJson, request_body
from ..service import Protected, Ready, ServiceDep

router = APIRouter(tags=["items"])

ItemId = Annotated[int, PathParam(ge=0, le=2**63 - 1, description="a gallery item's id", examples=[0])]
# The routes with an item id ask the service for the retriever in their body, after FastAPI has validated the
# id: a malformed id is a 422 even while the server is not ready.


@router.post("/v1/items", status_code=201, response_model=ItemsAdded, responses=ERRORS,
             openapi_extra=request_body(ItemsJson, ItemsForm),
             summary="Add images to the gallery (embedded with the index's submodel; one new index version)")
async def add_items(_: Protected, service: ServiceDep, retriever: Ready, new: ItemsBody) -> ItemsAdded:
    body, images = new
    items = await run_in_threadpool(retriever.add, images, body.labels, body.names, service.settings.write_wait)
    return ItemsAdded(items=items)


@router.get("/v1/items/{item_id}", response_model=Item, summary="Metadata of a gallery item", responses=ERRORS)
def item(item_id: ItemId, _: Protected, service: ServiceDep) -> dict:
    found = service.ready().item(item_id)
    if found is None:
        raise ApiError(404, "not_found", f"no item with id {item_id} in the index")
    return found


@router.delete("/v1/items/{item_id}", response_model=ItemsDeleted, responses=ERRORS,
               summary="Remove a gallery item (one new index version; ids are never reused)")
def delete_item(item_id: ItemId, _: Protected, service: ServiceDep) -> ItemsDeleted:
    return ItemsDeleted(deleted=service.ready().remove([item_id], wait=service.settings.write_wait))


@router.get("/v1/items/{item_id}/image", responses={**ERRORS, 200: {"content": {"image/*": {}}}},
            summary="The gallery image's bytes (only a regular file under an indexed root, within the size limit)")
def item_image(item_id: ItemId, _: Protected, service: ServiceDep) -> Response:
    content, media_type = service.ready().item_image(item_id, service.settings.max_item_image_bytes)
    return Response(content, media_type=media_type)
