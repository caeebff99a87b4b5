"""Writing blob bytes into files in the pieces the page cache takes most cheaply.

Every path that lands downloaded bytes on disk (pull, node warms from the store, a URL
or a peer, the ``file://`` store) writes through :func:`write_all`, in slices of
``WRITE_SLICE`` whatever size the bytes arrived in.

Why slices, and why 32 KiB: on a virtual machine whose idle memory goes back to the host
(virtio-balloon free page reporting, as on the machines weightship is benchmarked on),
the kernel time of filling the page cache depends on the size of each ``write()``.
Measured there, 1 GiB written a few seconds after memory was freed took 0.33-0.47 s of
kernel time in 32 KiB writes (12 runs of 12), but 0.95-2.99 s in writes of 8, 16, 64 or
128 KiB or 1 MiB (and 0.61-2.59 s in 256 KiB), almost all of it in the copy into the
page cache, as if each new page of those folios cost a fault in the host. With warm
memory every size costs 0.25-0.35 s, and the extra calls cost about 0.02 s of
interpreter time per GiB. A pull that wrote a MiB at a time spent more CPU on this than
on sha256. 32 KiB is also what Go's io.Copy, and so s5cmd, writes.
"""

from __future__ import annotations

from typing import Any

WRITE_SLICE = 32 * 1024


def write_all(out: Any, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data`` to the binary file object ``out``, ``WRITE_SLICE`` at a time."""
    n = len(data)
    if n <= WRITE_SLICE:
        out.write(data)
        return
    with memoryview(data) as view:
        for i in range(0, n, WRITE_SLICE):
            out.write(view[i : i + WRITE_SLICE])
