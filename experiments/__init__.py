"""Experiment entrypoints, the one trainer, and configs."""
