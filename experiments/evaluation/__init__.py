"""Evaluations of a run: loss by length and position (length_eval.py), answer accuracy on the reasoning tasks
(reasoning_eval.py), and the lm-evaluation-harness tasks the project ships (harness_tasks/; the backend that runs them is
experiments/training/harness_backend.py, next to the loop that evaluates them during training)."""
