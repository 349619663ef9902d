"""Held-out evaluations of a finished run: loss by length and position (length_eval.py) and answer accuracy on
the reasoning tasks (reasoning_eval.py)."""
