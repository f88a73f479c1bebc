"""batchd: Gemini Batch API jobs from manifests dropped in a folder."""

import pluggy

__version__ = "0.1.0"

#: Decorator for plugin hook implementations: ``from batchd import hookimpl``.
hookimpl = pluggy.HookimplMarker("batchd")

__all__ = ["hookimpl", "__version__"]
