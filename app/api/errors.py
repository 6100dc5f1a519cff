"""Errors as JSON `{"error": {"code", "message", "request_id"}}`: the library's user errors and HTTP errors
mapped to a status and a code, each message without the server's own paths."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import Scope

from matvit.errors import UserError
from matvit.images import DecodeTooLarge, ImageError, ImageTooLarge
from retrieval.retriever import EmbeddingError
from retrieval.store import DiskFull, IndexBusy, IndexCorrupt, IndexMissing, ItemImageRefused, ItemNotFound


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


def error_response(scope: Scope, status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    request_id = scope.get("state", {}).get("request_id")
    return JSONResponse({"error": {"code": code, "message": message, "request_id": request_id}}, status,
                        headers=headers)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = exc.code if isinstance(exc, ApiError) else HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(request.scope, exc.status_code, code, str(exc.detail), exc.headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return error_response(request.scope, 422, "validation_error", f"{where}: {first['msg']}" if where
                          else first["msg"])


async def user_error(request: Request, exc: UserError) -> JSONResponse:
    status, code = next((s, c) for kind, s, c in USER_ERRORS if isinstance(exc, kind))
    return error_response(request.scope, status, code, request.app.state.service.public(str(exc)))


HANDLERS = {HTTPException: http_error, RequestValidationError: validation_error, UserError: user_error}
