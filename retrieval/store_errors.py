"""What goes wrong with an index, in every store: each a `UserError`, said in one line."""

from __future__ import annotations

from matvit.errors import UserError


class IndexStoreError(UserError):
    """A missing, corrupt or mismatched index, or a bad index operation."""


class IndexMissing(IndexStoreError):
    """No index has been built at the place given (yet)."""


class IndexCorrupt(IndexStoreError):
    """An index whose files cannot be read as its manifest describes them."""


class IndexBusy(IndexStoreError):
    """Another writer holds the index's lock."""


class ItemNotFound(IndexStoreError):
    """An id the index does not hold, or an item whose image file is gone."""


class ItemImageRefused(IndexStoreError):
    """An item image that may not be served (outside the indexed roots, not a regular file, too large)."""


class DiskFull(IndexStoreError):
    """No space left where a write goes (ENOSPC, EDQUOT); the write left nothing behind."""
