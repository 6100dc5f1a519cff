"""The routes, one `APIRouter` per resource: health and metrics, the index and its submodels, search, items."""
