"""weightship: model weights as signed, versioned, content-addressed build artifacts.

The package is a library first; ``weightship.cli`` is a thin command-line layer on it.
Heavy dependencies (boto3, sigstore, safetensors, asyncssh) are imported where they are
used, so that importing ``weightship`` and running ``weightship --help`` stay fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
