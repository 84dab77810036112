"""The errors the catalog raises on purpose, in one module so that every catalog module can raise them."""


class CatalogError(Exception):
    """Base of every error the catalog raises on purpose."""


class CatalogVersionError(CatalogError):
    """The catalog file's schema version does not match this code."""


class CatalogLockedError(CatalogError):
    """Another process held the catalog file for longer than the open timeout."""


class ShardIntegrityError(CatalogError):
    """A shard's tar, Parquet and stats files disagree, or one of them is missing or unreadable."""
