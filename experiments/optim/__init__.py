"""Optimizers by name (`optimizer.name`, optimizers.py) and the transformations built here rather than taken
from optax (Shampoo, Grokfast)."""
