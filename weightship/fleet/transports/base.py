"""What every transport offers; results are the engine's own JSON documents."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from weightship.errors import WeightshipError

if TYPE_CHECKING:
    from weightship.fleet.inventory import Node
    from weightship.node.protocol import WarmRequest

OnEvent = Callable[[dict[str, Any]], None]
CONNECT_TIMEOUT = 10.0


class NodeUnreachable(WeightshipError):
    """The node could not be reached or did not answer: a state, not a crash.
    ``retryable`` is False when trying again cannot help (an unknown host key)."""

    def __init__(self, message: str, hint: str | None = None, *, retryable: bool = True) -> None:
        super().__init__(message, hint)
        self.retryable = retryable


class NodeFailed(WeightshipError):
    """The node answered, but the command failed before the engine could report.
    ``retryable`` is True when the node's process died (killed, OOM): a new one resumes."""

    def __init__(self, message: str, hint: str | None = None, *, retryable: bool = False) -> None:
        super().__init__(message, hint)
        self.retryable = retryable


class Transport(ABC):
    node: Node

    @abstractmethod
    async def warm(self, req: WarmRequest, on_event: OnEvent, *, detach: bool = False) -> dict[str, Any]:
        """Run a warm; return its result event. With ``detach``, return once the node has
        accepted it (``state: accepted``) and let it finish on its own."""

    @abstractmethod
    async def status(
        self, ref: str | None = None, version: str | None = None, digest: str | None = None, *, verify: bool = False
    ) -> dict[str, Any]:
        """The node's status document; ``verify`` re-hashes ready releases first."""

    @abstractmethod
    async def gc(self, keep: int, dry_run: bool) -> dict[str, Any]: ...

    async def have(self, hexdigests: list[str]) -> dict[str, Any]:
        """Which of these blobs the node holds (``{"blobs": {HEX: SIZE}, "partial": {HEX: N}}``):
        what a warm's planner asks before choosing who fetches what from where."""
        raise NodeFailed(f"{type(self).__name__} cannot list a node's blobs")

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass
