"""Reading a request body (JSON or a multipart form) into its pydantic model and image files, held to the
limits in `Settings`: a FastAPI dependency per kind of body."""

from __future__ import annotations

from typing import Annotated, Any, NamedTuple

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException

from .errors import ApiError
from .schemas import BatchForm, BatchJson, ItemsForm, ItemsJson, SearchForm, SearchJson, form_values
from .service import Settings, SettingsDep


class Parsed(NamedTuple):
    """A validated request body and its image files' bytes."""

    body: Any
    images: list[bytes]


async def open_form(request: Request, settings: Settings) -> FormData:
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


def check_images(request: Request, settings: Settings, images: list[bytes]) -> list[bytes]:
    """The one check of image files against the limits: how many, and how large each."""
    allowed = settings.images_per_request(request.url.path)
    if len(images) > allowed:
        raise ApiError(413, "too_many", f"{len(images)} images in one request; the limit is {allowed}")
    for content in images:
        if len(content) > settings.max_upload_bytes:
            raise ApiError(413, "too_large", f"image over the limit of {settings.max_upload_bytes:,} bytes")
    return images


async def parse_body(request: Request, settings: Settings, json_model: type[BaseModel],
                     form_model: type[BaseModel]) -> Parsed:
    """The body validated by `json_model` (JSON) or `form_model` (multipart), and its image files."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    try:
        if media == "application/json":
            body = json_model.model_validate_json(await request.body())
            return Parsed(body, check_images(request, settings, body.uploads()))
        if media == "multipart/form-data":
            form = await open_form(request, settings)
            try:
                body = form_model.model_validate(form_values(form, form_model))
                return Parsed(body, check_images(request, settings, [await upload.read() for upload in body.uploads()]))
            finally:
                await form.close()
    except ValidationError as e:
        if any(err["type"] == "json_invalid" for err in e.errors()):
            raise ApiError(400, "bad_json", "the request body is not valid JSON") from e
        raise RequestValidationError(e.errors()) from e
    raise ApiError(415, "unsupported_media_type", "send multipart/form-data or application/json")


def body_of(json_model: type[BaseModel], form_model: type[BaseModel]):
    """A dependency reading a body that `json_model` or `form_model` validates (see `schemas.request_body` for
    its OpenAPI schema)."""

    async def read(request: Request, settings: SettingsDep) -> Parsed:
        return await parse_body(request, settings, json_model, form_model)
    return read


SearchBody = Annotated[Parsed, Depends(body_of(SearchJson, SearchForm))]
BatchBody = Annotated[Parsed, Depends(body_of(BatchJson, BatchForm))]
ItemsBody = Annotated[Parsed, Depends(body_of(ItemsJson, ItemsForm))]
