"""The application: the service, its ASGI layers, error handlers and routers, and the loading of the model and
index in the background while the server already answers."""

from __future__ import annotations

import os
import threading
from contextlib import asynccontextmanager

import faiss
import torch
from fastapi import Depends, FastAPI

from .errors import HANDLERS
from .middleware import BodyLimit, RequestContext
from .routes import health, index, items, search
from .schemas import ErrorBody
from .service import Service, Settings, require_key


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
        description="Adaptive image retrieval: a gallery indexed once with a nested model's XL encoder (MatViT or "
                    "MatMamba), queried with whichever nested submodel fits the budget.",
    )
    app.state.service = service
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(RequestContext, service=service)  # added last: the outermost
    for exception, handler in HANDLERS.items():
        app.add_exception_handler(exception, handler)

    app.include_router(health.router)
    key = settings.metrics_need_key
    app.include_router(health.metrics, dependencies=[Depends(require_key)] if key else None,
                       responses={401: {"model": ErrorBody}} if key else None)
    app.include_router(index.router)
    app.include_router(search.router)
    app.include_router(items.router)
    return app
