"""The fleet: the inventory of regions and nodes, the transports that reach a node,
the warm plan (who fetches what from where) and the orchestration of warm, status and
gc over a region, returning typed reports."""
