"""weightship: model weights as signed, versioned, content-addressed build artifacts.

The package is a library first; ``weightship.cli`` is a thin command-line layer on it.
The functions here are the typed public API, each the library call behind a command::

    import weightship
    from weightship.trust.signers import KeySigner

    store = weightship.open_store("s3://models/weights")
    weightship.publish("./model", "minilm:1.0", store, tags=["prod"], signer=KeySigner("release.pem"))
    weightship.pull("minilm:prod", "./out", store)
    report = weightship.warm("minilm:prod", "us-east")      # the region from weightship.toml
    assert weightship.status("minilm:prod", "us-east").ok

Heavy dependencies (obstore, boto3, sigstore, asyncssh) are imported where they are
used, so that importing ``weightship`` and running ``weightship --help`` stay fast.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from weightship.version import __version__

if TYPE_CHECKING:
    from weightship.fleet.inventory import Node
    from weightship.fleet.orchestrate import StatusReport, WarmReport
    from weightship.fleet.transports.base import Transport
    from weightship.node.layout import CacheLayout
    from weightship.node.wait import RequestWarm, WaitResult
    from weightship.release import (
        PruneResult,
        PublishResult,
        PullResult,
        Release,
        RemoveResult,
        TagResult,
        UntagResult,
    )
    from weightship.store import Store
    from weightship.trust.policy import TrustPolicy
    from weightship.trust.signers import Signer


def open_store(url: str | None = None) -> Store:
    """``file://PATH``, ``s3://BUCKET/PREFIX``, ``az://CONTAINER/PREFIX`` or
    ``oci://HOST/NAMESPACE`` (default: the embedded ``file://.weightship/store``)."""
    from weightship.store import open_store as _open

    return _open(url)


def _store(store: Store | str | None) -> Store:
    from weightship.store import Store as _Store

    return store if isinstance(store, _Store) else open_store(store)


def resolve(ref: str, store: Store | str | None = None) -> Release:
    """The release ``NAME:VERSION``, ``NAME:TAG`` or ``NAME@sha256:HEX`` names."""
    from weightship import release

    return release.resolve(_store(store), ref)


def publish(
    source: Path | str,
    ref: str,
    store: Store | str | None = None,
    *,
    tags: Iterable[str] = (),
    signer: Signer | None = None,
    ignore: Iterable[str | Path] = (),
) -> PublishResult:
    """Pack, sign and push a model directory as ``NAME:VERSION`` (see ``weightship publish``)."""
    from weightship import release

    return release.publish(source, ref, _store(store), tags_=list(tags), signer=signer, ignore=ignore)


def pull(
    ref: str,
    dest: Path | str,
    store: Store | str | None = None,
    *,
    policy: TrustPolicy | None = None,
    force: bool = False,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
) -> PullResult:
    """Materialise a release into ``dest``, every byte and the signature verified first;
    ``force`` replaces a ``dest`` that is not empty, ``include``/``exclude`` (globs)
    take part of the release (see ``weightship pull``)."""
    from weightship import release

    return release.pull(_store(store), ref, dest, policy=policy, force=force, include=include, exclude=exclude)


def tag(ref: str, tag_name: str, store: Store | str | None = None) -> TagResult:
    """Point ``NAME:TAG`` at the release ``ref`` names; ``.previous`` is where it pointed."""
    from weightship import release

    return release.tag(_store(store), ref, tag_name)


def rm(ref: str, store: Store | str | None = None, *, force: bool = False) -> RemoveResult:
    """Remove the release ``NAME:VERSION``; ``force`` removes the tags pointing at it too
    (otherwise a tagged release is refused). Its blobs stay until :func:`prune`."""
    from weightship import release

    return release.rm(_store(store), ref, force=force)


def untag(ref: str, store: Store | str | None = None) -> UntagResult:
    """Remove the tag ``NAME:TAG`` (a version is refused: see :func:`rm`)."""
    from weightship import release

    return release.untag(_store(store), ref)


def prune(
    store: Store | str | None = None, *, grace: timedelta = timedelta(hours=24), dry_run: bool = False
) -> PruneResult:
    """Delete the blobs no release references (and signatures of removed releases) last
    modified more than ``grace`` ago; ``dry_run`` only says what would go."""
    from weightship import release

    return release.prune(_store(store), grace=grace, dry_run=dry_run)


def warm(
    ref: str,
    region: str,
    *,
    config: Path | None = None,
    store: str | None = None,
    tags: Iterable[str] = (),
    peers: bool = True,
) -> WarmReport:
    """Warm a release onto every node of ``region`` (from ``weightship.toml``, or the file
    ``config`` names) and return the report ``weightship warm --json`` prints."""
    import asyncio

    from weightship import config as _config
    from weightship import release
    from weightship.fleet import orchestrate, plan
    from weightship.fleet.inventory import load_fleet
    from weightship.fleet.transports import for_node

    cfg = _config.load(config)
    reg = load_fleet(cfg.data, cfg.path).region(region)
    st = open_store(store or reg.store or cfg.store_url())
    rel = release.resolve(st, ref)
    req = plan.build_request(st, rel, tags=plan.warm_tags(ref, rel, list(tags)))
    policy, where = cfg.policy(), str(cfg.path) if cfg.path else None

    def transport_for(node: Node) -> Transport:
        return for_node(node, policy=policy, config_path=where)

    return asyncio.run(orchestrate.warm_region(reg, rel, req, transport_for, ref=ref, peers=peers))


def status(ref: str | None, region: str, *, config: Path | None = None, store: str | None = None) -> StatusReport:
    """Per-node readiness of a release (or of everything) in ``region``: the report
    ``weightship status --json`` prints; ``.ok`` when every node is ready."""
    import asyncio

    from weightship import config as _config
    from weightship.fleet import orchestrate
    from weightship.fleet.inventory import load_fleet
    from weightship.fleet.transports import for_node

    cfg = _config.load(config)
    reg = load_fleet(cfg.data, cfg.path).region(region)
    queries = orchestrate.status_queries([reg], ref, lambda r: store or r.store or cfg.store_url())
    policy, where = cfg.policy(), str(cfg.path) if cfg.path else None

    def transport_for(node: Node) -> Transport:
        return for_node(node, policy=policy, config_path=where)

    return asyncio.run(orchestrate.status_regions([reg], queries, transport_for, ref=ref))


def wait_ready(
    cache: CacheLayout | Path | str,
    ref: str,
    timeout: float,
    *,
    request_warm: RequestWarm | None = None,
) -> WaitResult:
    """Wait up to ``timeout`` seconds for ``ref`` to be ready in the node cache ``cache``
    (what ``weightship node wait`` does, e.g. in a serving pod's init container); never
    raises for a failed warm or the timeout: the :class:`WaitResult` says which. See
    :func:`weightship.node.wait.wait_ready` for ``request_warm``."""
    from weightship.node import wait

    return wait.wait_ready(cache, ref, timeout, request_warm=request_warm)


def __getattr__(name: str) -> object:
    # Classes cannot be wrapped as the functions above are: they load on first use (PEP 562),
    # so that ``import weightship`` does not load the node engine.
    if name == "WaitResult":
        from weightship.node.wait import WaitResult

        return WaitResult
    raise AttributeError(f"module 'weightship' has no attribute {name!r}")


__all__ = [
    "WaitResult",
    "__version__",
    "open_store",
    "prune",
    "publish",
    "pull",
    "resolve",
    "rm",
    "status",
    "tag",
    "untag",
    "wait_ready",
    "warm",
]
