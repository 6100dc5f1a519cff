"""The ASGI layers around the routes: request ids, JSON 500s and request metrics (`RequestContext`), and
the body size limit (`BodyLimit`)."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, error_response
from .service import Service, Settings

log = logging.getLogger(__name__)

CLIENT_GONE = 499  # counted in /metrics for a request whose client disconnected before its body was read (nginx's)
REQUEST_ID = re.compile(r"[!-~]{1,128}")  # printable ASCII, no spaces


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

