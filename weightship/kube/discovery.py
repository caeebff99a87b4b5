"""Finding a region's agents in Kubernetes: the Running and Ready pods a label selector
picks in a namespace, with their pod IPs and the names of their nodes.

A fleet file's ``[regions.NAME] kubernetes = { namespace = …, selector = … }`` is turned
into nodes by :mod:`weightship.fleet.inventory` from what :func:`find_agents` returns, so
that autoscaled GPU nodes join a region without an edit of weightship.toml.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from weightship.errors import ConfigError
from weightship.kube.client import KubeError, api_errors, describe, open_client

_KEY = r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?/)?[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?"
_REQUIREMENT = re.compile(
    rf"^\s*(?:(?P<not>!)\s*(?P<nkey>{_KEY})"
    rf"|(?P<key>{_KEY})\s*(?:(?P<op>==|!=|=)\s*(?P<value>{_VALUE})"
    rf"|\s+(?P<set>in|notin)\s*\((?P<values>[^()]*)\))?)\s*$"
)


@dataclass(frozen=True)
class AgentPod:
    """One agent pod: where it listens and which node it runs on."""

    pod: str
    node: str
    ip: str


def parse_selector(text: str) -> list[tuple[str, str, list[str]]]:
    """A label selector as kubectl takes it (``app=agent,tier in (gpu, big),!legacy``):
    (key, operator, values) per requirement, the operator one of ``=``, ``!=``, ``in``,
    ``notin``, ``exists`` and ``!``. Raises ValueError saying what is wrong. (No lightkube
    here: weightship.toml is checked by every command, and this is part of the check.)"""
    parts = re.split(r",(?![^()]*\))", text)
    if not text.strip() or any(not p.strip() for p in parts):
        raise ValueError(f"{text!r} is not a label selector; write e.g. app=weightship-agent")
    out: list[tuple[str, str, list[str]]] = []
    for part in parts:
        m = _REQUIREMENT.match(part)
        if not m:
            raise ValueError(
                f"{part.strip()!r} is not a label requirement; write key=value, key!=value, key in (a,b), key or !key"
            )
        if m.group("nkey"):
            out.append((m.group("nkey"), "!", []))
        elif m.group("op"):
            out.append((m.group("key"), "!=" if m.group("op") == "!=" else "=", [m.group("value")]))
        elif m.group("set"):
            values = [v.strip() for v in m.group("values").split(",")]
            if not all(v and re.fullmatch(_VALUE, v) for v in values):
                raise ValueError(f"{part.strip()!r}: the values in parentheses must be label values")
            out.append((m.group("key"), m.group("set"), values))
        else:
            out.append((m.group("key"), "exists", []))
    return out


def _lightkube_selector(requirements: list[tuple[str, str, list[str]]]) -> list[tuple[str, Any]]:
    from lightkube import operators

    ops = {
        "=": lambda v: operators.equal(v[0]),
        "!=": lambda v: operators.not_equal(v[0]),
        "in": operators.in_,
        "notin": operators.not_in,
        "exists": lambda v: operators.exists(),
        "!": lambda v: operators.not_exists(),
    }
    return [(key, ops[op](values)) for key, op, values in requirements]


def _ready(pod: Any) -> bool:
    status = pod.status
    if status is None or status.phase != "Running" or not status.podIP:
        return False
    if pod.metadata is not None and pod.metadata.deletionTimestamp is not None:
        return False  # terminating: it will not answer for long
    return any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])


def find_agents(
    namespace: str, selector: str, *, kubeconfig: str | None = None, context: str | None = None
) -> list[AgentPod]:
    """The Running and Ready pods ``selector`` picks in ``namespace``, one per node (the
    newest, should a rollout briefly run two), by node name. Raises ConfigError (exit 2)
    for missing or unusable credentials, KubeError (exit 1) when the API fails."""
    from lightkube.resources.core_v1 import Pod

    try:
        pairs = _lightkube_selector(parse_selector(selector))
    except ValueError as e:
        raise ConfigError(f"selector: {e}") from None
    client = open_client(kubeconfig=kubeconfig, context=context)
    try:
        pods = list(client.list(Pod, namespace=namespace, labels=pairs))
    except api_errors() as e:
        server = client.config.cluster.server
        raise KubeError(
            f"cannot list the agent pods ({selector}) in namespace {namespace} at {server}: {describe(e)}",
            "check the kubeconfig's context and that it may list pods there",
        ) from None
    finally:
        client.close()
    by_node: dict[str, tuple[str, AgentPod]] = {}
    for pod in pods:
        if not _ready(pod) or not pod.spec or not pod.spec.nodeName:
            continue
        created = str(pod.metadata.creationTimestamp or "") if pod.metadata else ""
        found = AgentPod(pod.metadata.name if pod.metadata else "", pod.spec.nodeName, pod.status.podIP)
        if found.node not in by_node or created > by_node[found.node][0]:
            by_node[found.node] = (created, found)
    return [by_node[n][1] for n in sorted(by_node)]


__all__ = ["AgentPod", "find_agents", "parse_selector"]
