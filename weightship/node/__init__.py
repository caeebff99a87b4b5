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
    metrics     what a warm tells as bytes move: a no-op Meter, or the agent's Prometheus
                counters (prometheus_client is imported only for the agent's)
    wait        node wait: block until a release is ready in the cache (inotify, else
                a look every second), optionally asking the agent to warm it
    serve_http  the agent: the engine behind an HTTP API

Nothing here imports the engine at package import: ``weightship.node.protocol`` loads
without it.
"""
