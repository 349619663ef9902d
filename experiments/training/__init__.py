"""The one training loop and its infrastructure: the train step and loop (trainer.py), the train state and
optimizer construction (train_state.py), checkpoints (checkpointing.py), the mesh and logical axes
(sharding.py), config validation (validation.py), the command-line runner (cli.py), metrics and plots, the
training-dynamics monitors, warm starts from another run, and lm-evaluation-harness tasks during training (the
`beyond` backend in harness_backend.py, the runner in harness_evals.py, its keys in harness_keys.py)."""
