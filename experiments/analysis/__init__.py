"""Interpretability on a finished run: activations at named sites of any family (activations.py) and stores of
them on disk, the logit lens, linear probes, activation patching, steering, attention plots, SAE evaluation and
dashboards, grokking's progress measures and Coconut's latent search. Each command reads a run folder."""
