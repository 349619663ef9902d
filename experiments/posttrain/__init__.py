"""Post-training that is not an objective: LoRA adapters on any family (lora.py) and merging run folders
fine-tuned from one base (merge.py). The objectives (distillation, preferences, GRPO) are in objectives/,
the Hugging Face import is the `experiments.import_hf` command."""
