"""Transports carry a request to a node's engine and its events back; nothing more.

``local`` runs :class:`weightship.node.cache.NodeCache` in this process, ``ssh`` runs
``weightship node …`` on the node over asyncssh, ``agent`` talks to ``weightship agent
serve`` over HTTP. Every one answers with the engine's own result events, and turns a
node it cannot reach into :class:`NodeUnreachable` rather than a crash.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from weightship.fleet.transports.base import NodeUnreachable, Transport

if TYPE_CHECKING:
    from weightship.fleet.inventory import Node
    from weightship.trust.policy import TrustPolicy

__all__ = ["NodeUnreachable", "Transport", "for_node"]


def for_node(
    node: Node,
    *,
    policy: TrustPolicy | None = None,
    config_path: str | None = None,
    accept_new_host_keys: bool = False,
) -> Transport:
    """The transport for a fleet node. ``policy`` and ``config_path`` are this machine's
    [policy] and weightship.toml, what a ``local`` node without its own ``config`` uses."""
    if node.kind == "ssh":
        from weightship.fleet.transports.ssh import SshTransport

        return SshTransport(node, accept_new_host_keys=accept_new_host_keys)
    if node.kind == "agent":
        from weightship.fleet.transports.agent import AgentTransport

        return AgentTransport(node)
    from weightship.fleet.transports.local import LocalTransport

    return LocalTransport(node, policy=policy, config_path=config_path)
