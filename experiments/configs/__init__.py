"""Experiment configs: Python files whose `get_config(arg=None)` returns a ConfigDict."""
