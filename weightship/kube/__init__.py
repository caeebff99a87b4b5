"""Kubernetes: node labels that say which releases a node's cache holds ready, and the
discovery of a region's agents from the pods of a DaemonSet.

``client`` opens the API (in-cluster service account, or a kubeconfig); ``labels`` is the
label scheme and the agent's reconciler; ``discovery`` lists the agent pods of a region.
lightkube and its models are imported only by the code that talks to the API.
"""
