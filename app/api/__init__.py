"""The REST API (FastAPI). It validates requests and calls `retrieval.Retriever`; it holds no model or index logic.

Errors are JSON `{"error": {"code", "message", "request_id"}}`: user input never causes a 500, and an
unexpected failure is a JSON 500 whose traceback is logged once. Every response carries `X-Request-ID`.
Limits live in `Settings`; a request body is refused (413) as soon as it passes its route's byte limit,
whatever its content type or transfer encoding. Inference and index writes run in worker threads,
never on the event loop; concurrent queries for one submodel are encoded as one batch (`retrieval.batching`),
at most `inference_slots` batches at a time (writes take no slot).

The modules, in FastAPI's layout: `schemas` (request and response bodies), `service` (the state and the
dependencies that hand it to the routes), `bodies` (reading a JSON or multipart body within the limits),
`errors`, `middleware`, `routes` (a router per resource) and `main` (`create_app`).
"""

from .main import create_app
from .service import Settings

__all__ = ["Settings", "create_app"]
