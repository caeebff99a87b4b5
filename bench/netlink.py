"""Emulated network links for the benchmarks (root only).

A :class:`Link` is a network namespace joined to this one by a veth pair, each end
throttled by ``tc qdisc … tbf`` so that the namespace has ``rate`` down and ``rate`` up,
whatever the CPUs could do on loopback. A :class:`Region` is a set of links routed
through this namespace: traffic from one namespace to another crosses the sender's link
up and the receiver's link down, as between the hosts of a data centre, each behind its
own NIC.

Every pair gets a /30 of its own. bench/coldstart.py uses 10.200.0.0/16 and
bench/fanout.py 10.201.0.0/16, the third byte derived from the process ID and skipping any
already in use, so that the benchmarks, and two runs of one, can share a machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

# tbf refills its bucket at most once a timer tick; a bucket smaller than one tick's worth
# of bytes caps the rate below the one asked for (CONFIG_HZ is 250 on common kernels).
TICK_HZ = 250
MIN_BURST = 256 * 1024


def run(*cmd: str | os.PathLike, check: bool = True) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def tbf(rate_mbit: int) -> list[str]:
    """The ``tc`` arguments that hold a device's egress to ``rate_mbit``."""
    burst = max(MIN_BURST, rate_mbit * 1_000_000 // 8 // TICK_HZ)
    return ["root", "tbf", "rate", f"{rate_mbit}mbit", "burst", f"{burst // 1024}kb", "latency", "100ms"]


class Link:
    """A network namespace holding one end of a veth pair, the other end here, with
    ``host_ip`` and ``ns_ip`` on the two ends (a /30 only this pair uses)."""

    def __init__(self, ns: str, host_if: str, ns_if: str, host_ip: str, ns_ip: str) -> None:
        self.ns, self.host_if, self.ns_if = ns, host_if, ns_if
        self.host_ip, self.ns_ip = host_ip, ns_ip
        self.rate: int | None = None

    def exec(self) -> list[str]:
        """The prefix that runs a command inside the namespace, keeping its PID."""
        return ["ip", "netns", "exec", self.ns]

    def up(self, *, route: str | None = None) -> None:
        """``route``: addresses the namespace reaches through this one, which forwards what
        arrives on the pair (enabled on the interface, not machine-wide, so nothing else on
        this machine starts being routed, and nothing global needs restoring)."""
        run("ip", "netns", "add", self.ns)
        run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        run("ip", "link", "set", self.ns_if, "netns", self.ns)
        run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        if route:
            Path(f"/proc/sys/net/ipv4/conf/{self.host_if}/forwarding").write_text("1\n")
        run("ip", "link", "set", self.host_if, "up")
        run(*self.exec(), "ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        run(*self.exec(), "ip", "link", "set", self.ns_if, "up")
        run(*self.exec(), "ip", "link", "set", "lo", "up")
        if route:
            run(*self.exec(), "ip", "route", "add", route, "via", self.host_ip)

    def throttle(self, rate_mbit: int) -> None:
        self.rate = rate_mbit
        run(*self.exec(), "tc", "qdisc", "replace", "dev", self.ns_if, *tbf(rate_mbit))
        run("tc", "qdisc", "replace", "dev", self.host_if, *tbf(rate_mbit))

    def down(self) -> None:
        # Deleting the namespace deletes its end of the pair, and with it the pair; the
        # second command is for a namespace that never got its end.
        run("ip", "netns", "del", self.ns, check=False)
        run("ip", "link", "del", self.host_if, check=False)


class Region:
    """``len(names)`` links in ``net``.T.0/24 (T from the process ID), routed through
    this namespace. Usable as a context manager: the links go away on leaving it, also
    on Ctrl-C or SIGTERM (which it turns into SystemExit while it is up)."""

    def __init__(self, names: list[str], prefix: str, net: str) -> None:
        if len(names) > 63:
            raise ValueError("a region has at most 63 links (one /24 of /30s)")
        pid = os.getpid()
        # Interface names have at most 15 characters; namespace names carry the whole PID,
        # so that remove_stale can tell whether the run that made them is still alive.
        tag, third = pid % 100000, _free_third(net, pid % 250)
        if len(f"{prefix}{tag}h{len(names)}") > 15:
            raise ValueError(f"prefix {prefix!r} too long for interface names")
        self.prefix = prefix
        self.subnet = f"{net}.{third}.0/24"
        self.links: dict[str, Link] = {}
        for i, name in enumerate(names):
            host_ip, ns_ip = f"{net}.{third}.{4 * i + 1}", f"{net}.{third}.{4 * i + 2}"
            self.links[name] = Link(
                f"{prefix}-{pid}-{name}", f"{prefix}{tag}h{i}", f"{prefix}{tag}n{i}", host_ip, ns_ip
            )
        self._old_term: object = None

    def __getitem__(self, name: str) -> Link:
        return self.links[name]

    def up(self) -> None:
        remove_stale(self.prefix)
        for link in self.links.values():
            link.up(route=self.subnet)

    def throttle(self, rate_mbit: int, names: list[str] | None = None) -> None:
        for name in names or list(self.links):
            self.links[name].throttle(rate_mbit)

    def down(self) -> None:
        with _signals_held():
            for link in self.links.values():
                link.down()

    def __enter__(self) -> Region:
        self._old_term = signal.signal(signal.SIGTERM, exit_on_signal)
        try:
            self.up()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()
        signal.signal(signal.SIGTERM, self._old_term)  # type: ignore[arg-type]


def exit_on_signal(signum: int, frame: object) -> None:
    """A SIGTERM handler that unwinds like Ctrl-C does, so that ``finally`` blocks and
    context managers tear down what they set up."""
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """A second Ctrl-C must not leave half the links behind."""
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def remove_stale(prefix: str) -> None:
    """Namespaces ``PREFIX-PID-…`` left by a run killed with SIGKILL, whose PID is gone."""
    for line in run("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if len(parts) < 2 or parts[0] != prefix or not parts[1].isdigit():
            continue
        if not Path(f"/proc/{parts[1]}").exists():
            run("ip", "netns", "del", name, check=False)


def _free_third(net: str, start: int) -> int:
    """A third byte no address of this namespace uses yet in ``net``: two runs whose PIDs
    agree modulo 250 would otherwise route each other's traffic."""
    used = set()
    for line in run("ip", "-o", "-4", "addr", "show").splitlines():
        for word in line.split():
            if word.startswith(f"{net}."):
                used.add(int(word.split(".")[2]))
    for k in range(250):
        third = (start + k) % 250
        if third not in used:
            return third
    raise RuntimeError(f"every /24 of {net}.0.0/16 is in use")
