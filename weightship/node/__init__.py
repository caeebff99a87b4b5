"""The node engine: one cache directory on a node's NVMe and the only code that changes
it. Every transport (local, ssh, agent) drives it through the protocol in
:mod:`weightship.node.protocol`; none has cache logic of its own."""
