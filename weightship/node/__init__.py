"""The node side: one cache directory on a node's NVMe, and the only code that changes it.

    protocol    the typed node protocol (requests, events, results and their JSON); what
                the client transports import, and all they import of this package
    cache       NodeCache, the engine's entry point: status, have, pins, peer blobs
    layout      the cache directory: paths, records, the lock, tags, space accounting
    arrivals    blobs on their way in, as peers read them
    warm        the warm pipeline
    space       making room, eviction, gc
    integrity   verify, a peer's report of a bad blob, quarantine, withdrawal
    fetch       where blob bytes come from (the origin, the region's peers: peers)
    serve_http  the agent: the engine behind an HTTP API

Nothing here imports the engine at package import: ``weightship.node.protocol`` loads
without it.
"""
