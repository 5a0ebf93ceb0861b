"""edrop_ray: EDropout (energy-based dropout and pruning) as a distributed population search.

The algorithm (units, masking, energy, population, training, slimming) is plain PyTorch;
``edrop_ray.distributed`` is the thin Ray layer around it. The Python API: :func:`prune` (the
whole method on your own network and data), :class:`EDropout` (the search in your own loop).
"""

__version__ = "0.1.0"

__all__ = ["prune", "PruneResult", "EDropout", "DEParams", "__version__"]

_API = ("prune", "PruneResult", "EDropout", "DEParams")


def __getattr__(name: str):
    # The public API imports torch and Torch-Pruning; load it on first use, so that the CLI
    # starts (and refuses bad input) without paying for them.
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'edrop_ray' has no attribute {name!r}")
