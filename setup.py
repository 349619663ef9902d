"""beyond: a JAX/Flax research codebase for sequence models beyond the plain transformer."""

import setuptools

setuptools.setup(
    name="beyond",
    version="0.1.0",
    description="Sequence models beyond the plain transformer, in JAX/Flax: "
    "one sharded trainer, resumable experiments, Pallas kernels.",
    license="Apache-2.0",
    license_files=["LICENSE", "NOTICE"],
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["models*", "experiments*", "kernels_pallas*", "data*"]),
    include_package_data=True,
    package_data={"data": ["files/*", "files/*/*"],  # the shipped data sets (data/files/README.md)
                  "experiments": ["evaluation/harness_tasks/*"]},  # the shipped lm_eval tasks (YAML + JSONL)
    # Ranges are the ones this repository is tested with (CPU, jax 0.10.x; GPU image jax 0.11).
    install_requires=[
        "jax>=0.10,<0.12",
        "flax>=0.12,<0.13",
        "optax>=0.2.6,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "chex>=0.1.90,<0.2",
        "grain>=0.2.15,<0.3",
        "qwix>=0.1.8,<0.2",  # quantized numerics: quantization-aware training and quantized runs (models/quantization.py)
        "absl-py>=2.1,<3",
        "ml_collections>=1.0,<2",
        "numpy>=2.0,<3",
        "matplotlib>=3.8,<4",
        "tensorboardX>=2.6,<3",
        "sentencepiece>=0.2,<0.2.3",  # 0.2.3's generated proto module needs protobuf >= 7.36; apache-beam ([beam]) pins < 7
        "tqdm>=4.66,<5",  # progress bars of long work (data.prepare)
    ],
    extras_require={
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "ruff>=0.14,<1", "hypothesis>=6.100,<7",
                 "pyarrow>=15,<27"],  # the Parquet path of data.prepare is tested by default
        "corpora": ["pyarrow>=15,<27"],  # Parquet corpora for data.prepare
        "beam": ["apache-beam>=2.60,<3"],  # data.prepare --runner=beam (data/prepare_beam.py)
        "seqio": ["seqio>=0.0.19,<0.1"],  # pulls in TensorFlow
        # The documentation site (mkdocs.yml): `mkdocs serve` locally, `mkdocs build --strict` in CI.
        "docs": ["mkdocs>=1.6,<2", "mkdocs-material>=9.5,<10", "mkdocstrings[python]>=0.27,<2"],
        # Checkpoints in and out of transformers (experiments/import_hf.py, export_hf.py: safetensors and the
        # tokenizer.json; data.tokenizer="hf"), and the parity tests against transformers and lm_eval's hf model
        # (accelerate); torch 2.13.0 is the CPU build the CI machines hold.
        "hf": ["torch>=2.9,<=2.13.0", "transformers>=5.20,<6", "safetensors>=0.4,<1", "tokenizers>=0.22,<1",
               "accelerate>=1.0,<2"],
        # lm-evaluation-harness on our backend (experiments/lm_eval.py, experiments/training/harness_backend.py): its
        # core, without torch.
        "eval": ["lm_eval>=0.4.13,<0.5"],
        # Weights & Biases beside TensorBoard (train.wandb, experiments/training/wandb_run.py).
        "wandb": ["wandb>=0.22,<1"],
    },
)
