"""edrop_ray: EDropout (energy-based dropout and pruning) as a distributed population search.

The algorithm (units, masking, energy, population, training, slimming) is plain PyTorch;
``edrop_ray.distributed`` is the thin Ray layer around it.
"""

__version__ = "0.1.0"
