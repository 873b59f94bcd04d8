"""Where backups live: object stores and the repository engines on top of them."""

from __future__ import annotations

from drtool.config import RepositoryConfig
from drtool.repo.base import Repository


def open_repository(cfg: RepositoryConfig, create: bool = False) -> Repository:
    """The repository a configuration names; `create` makes a native one where none is."""
    if cfg.url.startswith("restic:"):
        from drtool.repo.restic import ResticRepository

        return ResticRepository(cfg, create=create)
    from drtool.repo.native import NativeRepository
    from drtool.repo.objectstore import open_store

    options = {}
    if cfg.sse:
        options["sse"] = cfg.sse
    if cfg.sse_kms_key_id:
        options["sse_kms_key_id"] = cfg.sse_kms_key_id
    store = open_store(cfg.url, endpoint_url=cfg.endpoint_url or None, region=cfg.region or None, **options)
    if cfg.encryption_key_file:
        from drtool.repo.encryption import EncryptedStore, load_key

        store = EncryptedStore(store, load_key(cfg.encryption_key_file))
    if create:
        NativeRepository.init(store)
    return NativeRepository(store, compression_level=cfg.compression_level)
