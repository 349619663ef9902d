"""The lm-evaluation-harness tasks the project ships: YAML files and their data (shakespeare.py makes them)."""
