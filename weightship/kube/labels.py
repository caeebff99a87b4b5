"""Node labels: which releases a node's cache holds ready, under which tags, for the
Kubernetes scheduler.

An agent started with ``--kubernetes-node NAME`` keeps one label per tag that points at a
ready release on its Node (docs/kubernetes.md)::

    models.weightship.dev/<NAME>.<TAG>: <VERSION>

so that a serving pod can require ``models.weightship.dev/llama-3-8b.prod In [v7]`` (or
``Exists``) in its node affinity and never lands on a node whose cache is not ready.

Kubernetes allows a label's name part and its value at most 63 characters of
``[A-Za-z0-9._-]``, beginning and ending with a letter or digit. A model name and a tag
that fit, where the tag has no ``.`` (so the last ``.`` tells name from tag), are
written as they are. Anything else is written sanitised and shortened, followed by ``-``
and ten hex digits of the sha256 of ``NAME:TAG`` (of the version, for a value): two
distinct names never share a label. A plain name never ends like that, so a plain name and
a hashed one never meet either.

The reconciler (:class:`NodeLabeler`) computes the labels the cache calls for at start,
after each warm, gc, verify and eviction (it watches the cache's tags and records), and
every few minutes; it reads the Node and patches only the difference (a JSON merge
patch, removed keys set to null), never touching a label outside its prefix. An API that
fails is one line in the agent's log; the next reconcile tries again, and warming never
waits for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightkube import Client

    from weightship.node.layout import CacheLayout

PREFIX = "models.weightship.dev"
# Name part and value: at most 63 characters, [A-Za-z0-9._-], alphanumeric at both ends.
_LABEL_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_HASHED_RE = re.compile(r"-[0-9a-f]{10}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
HASH_LEN = 10
# How often the cache is looked at for a change (a directory listing and a few small files).
POLL_SECONDS = 2.0
# After a failed call, the API is tried again this long after (or at the next poke).
RETRY_SECONDS = 10.0
# A reconcile also runs this often without a change in the cache: labels that someone
# removed by hand come back.
RESYNC_SECONDS = 300.0


def _fits(text: str) -> bool:
    return bool(_LABEL_RE.match(text)) and not _HASHED_RE.search(text)


def _hashed(text: str, source: str) -> str:
    """``text`` made valid and short enough for ``-`` and ten hex digits of sha256(source)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:HASH_LEN]
    head = _UNSAFE.sub("-", text)[: 63 - HASH_LEN - 1]
    head = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", head)
    return f"{head}-{digest}" if head else f"h-{digest}"


def label_key(name: str, tag: str) -> str:
    """The label (with its prefix) that says which version ``NAME:TAG`` is ready in."""
    plain = f"{name}.{tag}"
    # The tag has no '.', so the last '.' tells name from tag: two plain labels never meet.
    part = plain if "." not in tag and _fits(plain) else _hashed(plain, f"{name}:{tag}")
    return f"{PREFIX}/{part}"


def label_value(version: str) -> str:
    """The value of a tag's label: the version, or its hashed form when it does not fit."""
    return version if _fits(version) else _hashed(version, version)


def is_ours(key: str) -> bool:
    return key.startswith(PREFIX + "/")


def desired_labels(cache: CacheLayout) -> dict[str, str]:
    """The labels this cache calls for: one per tag that points at a release whose record
    says ``ready`` (a release being warmed, failed, withdrawn or evicted has none)."""
    out: dict[str, str] = {}
    if not cache.models.is_dir():
        return out
    for model_dir in sorted(cache.models.iterdir()):
        if not model_dir.is_dir() or model_dir.is_symlink():
            continue
        name = model_dir.name
        for tag, version in sorted(cache.tags(name).items()):
            rec = cache.read_record(name, version)
            if rec and rec.get("state") == "ready":
                out[label_key(name, tag)] = label_value(version)
    return out


def label_patch(current: dict[str, str], desired: dict[str, str]) -> dict[str, str | None]:
    """The merge patch of ``metadata.labels`` that turns the Node's labels under our prefix
    into ``desired``: changed and new keys set, ours that are gone set to None (null)."""
    patch: dict[str, str | None] = {k: v for k, v in desired.items() if current.get(k) != v}
    patch.update({k: None for k in current if is_ours(k) and k not in desired})
    return patch


class NodeLabeler:
    """Keeps the weightship labels of one Node equal to what a cache holds ready.

    A daemon thread does the work, so a warm never waits on the API. It reads the cache's
    tags and records every ``poll`` seconds (a few small files) and reconciles when what
    they call for changed: after a warm, gc, verify or eviction, whichever process made
    it (the agent, or ``weightship node`` on the same cache). It also reconciles at start,
    every ``resync`` seconds (labels someone removed come back), after a failure every
    ``retry`` seconds, and at once on :meth:`poke`. Only ``get`` and ``patch`` of that
    Node are used.
    """

    def __init__(
        self,
        cache: CacheLayout,
        node: str,
        log: Callable[[str], None],
        *,
        client: Callable[[], Client] | None = None,
        poll: float = POLL_SECONDS,
        retry: float = RETRY_SECONDS,
        resync: float = RESYNC_SECONDS,
    ) -> None:
        self.cache = cache
        self.node = node
        self.log = log
        self._open = client or _agent_client
        self._client: Client | None = None
        self.poll, self.retry, self.resync = poll, retry, resync
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The last failure logged: the same one again is not logged at every retry.
        self._failing: str | None = None
        # What the Node's labels were made equal to, and when; None until a reconcile worked.
        self.applied: dict[str, str] | None = None
        self._applied_at = 0.0
        self._failed_at = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="kube-labels")
        self._thread.start()

    def poke(self) -> None:
        """Reconcile now (cheap, never blocks, never raises)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        poked = True  # the first reconcile, at start
        while not self._stop.is_set():
            try:
                desired = desired_labels(self.cache)
            except OSError as e:
                desired = None
                self._fail(f"cannot read the cache {self.cache.root}: {e.strerror or e}")
            now = time.monotonic()
            if self._failing is not None:
                due = now - self._failed_at >= self.retry
            else:
                due = desired != self.applied or now - self._applied_at >= self.resync
            if desired is not None and (due or poked):
                self.reconcile(desired)
            poked = self._wake.wait(self.poll)
            self._wake.clear()

    def reconcile(self, desired: dict[str, str] | None = None) -> dict[str, str | None] | None:
        """One reconcile: the patch applied ({} when nothing changed), None when it failed
        (logged once per distinct failure; a later reconcile tries again)."""
        from weightship.kube.client import api_errors, describe

        try:
            if desired is None:
                desired = desired_labels(self.cache)
            if self._client is None:
                self._client = self._open()
            patch = self._apply(self._client, desired)
        except api_errors() as e:
            self._drop_client()
            self._fail(describe(e))
            return None
        except Exception as e:  # a bug here must end neither the thread nor the agent
            self._drop_client()
            self._fail(f"{type(e).__name__}: {e}")
            return None
        self.applied, self._applied_at = desired, time.monotonic()
        if self._failing is not None:
            self.log(f"kubernetes: labelling node {self.node} works again")
            self._failing = None
        if patch:
            added = sorted(f"{k}={v}" for k, v in patch.items() if v is not None)
            removed = sorted(k for k, v in patch.items() if v is None)
            said = ", ".join([*(f"+{a}" for a in added), *(f"-{r}" for r in removed)])
            self.log(f"kubernetes: node {self.node} labels {said}")
        return patch

    def _apply(self, client: Client, desired: dict[str, str]) -> dict[str, str | None]:
        from lightkube.resources.core_v1 import Node
        from lightkube.types import PatchType

        node = client.get(Node, self.node)
        current = dict((node.metadata.labels if node.metadata else None) or {})
        patch = label_patch(current, desired)
        if patch:
            # A JSON merge patch names only our keys: labels others set are not sent, so
            # they cannot be overwritten, and a key set to null is removed.
            client.patch(Node, self.node, {"metadata": {"labels": patch}}, patch_type=PatchType.MERGE)
        return patch

    def _drop_client(self) -> None:
        """Close the client after a failure: a fresh connection (and a re-read configuration)
        next time, and no connection left open per failed reconcile of a long outage."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def _fail(self, why: str) -> None:
        self._failed_at = time.monotonic()
        if why != self._failing:
            self.log(
                f"warning: kubernetes: cannot label node {self.node} ({why}); warming goes on,"
                f" and labelling is tried again within {self.retry:g}s"
            )
            self._failing = why


def _agent_client() -> Client:
    from weightship.kube.client import open_client

    return open_client(prefer_in_cluster=True)


__all__ = [
    "POLL_SECONDS",
    "PREFIX",
    "RESYNC_SECONDS",
    "RETRY_SECONDS",
    "NodeLabeler",
    "desired_labels",
    "is_ours",
    "label_key",
    "label_patch",
    "label_value",
]
