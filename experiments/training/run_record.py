"""What a workdir records about its run, and the check that a resume continues the same run.

    config.json   the resolved config (docs/interfaces.md)
    data.json     the data's identity (`data.identity`): a SHA-256 of every token array, and for text the
                  file's path, size and SHA-256 and the tokenizer model's SHA-256

Both are written atomically (a temporary file renamed), so a kill never leaves half a file. A workdir with
checkpoints resumes only with the same model, optimizer, data and seed: anything else is refused in one line
naming what changed. Keys that say how long, how often, on what mesh or with which kernels the run goes
(`MAY_CHANGE`) may differ. A key the saved config lacks (added to the code after the run started) counts as
unchanged when it holds its default: the run it names is the same.
"""

import json
import os

from data.config_fields import ConfigError

MAY_CHANGE = ("train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
              "train.keep_checkpoints", "train.plot_log_x", "train.nan_rollbacks", "train.grad_accum_steps",
              "mesh.", "data.eval_batch_size", "model.attention_impl", "model.ssd_impl", "model.remat",
              "model.scan_unroll", "model.kv_cache_dtype", "model.mla_absorb", "train.evals.",
              "train.profile_steps", "train.peak_flops", "train.wandb.")
DATA_KEYS = (("file_sha256", "the text file"), ("tokenizer_sha256", "the tokenizer model"),
             ("tokens_sha256", "the token arrays"))


def write_json(path: str, value) -> None:
    """`value` as JSON at `path`, atomically."""
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def record(workdir: str, config: dict, data_identity: dict) -> None:
    write_json(os.path.join(workdir, "config.json"), config)
    write_json(os.path.join(workdir, "data.json"), data_identity)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _read(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def config_changes(saved: dict, current: dict, defaults: dict | None = None) -> list[str]:
    """'key old -> new' for every key that differs and may not change on resume; a key absent from `saved`
    that holds its value in `defaults` (the schema's defaults) is not a change."""
    old, new, default = _flatten(saved), _flatten(current), _flatten(defaults or {})
    for key in new.keys() - old.keys():
        if key in default and new[key] == default[key]:
            old[key] = new[key]
    return [f"{key} {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}" for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key) and not key.startswith(MAY_CHANGE)]


def data_changes(saved: dict, current: dict) -> list[str]:
    where = current.get("file") or saved.get("file")
    return [f"{what}{f' {where}' if key == 'file_sha256' else ''} (sha256 {str(saved.get(key))[:12]} -> "
            f"{str(current.get(key))[:12]})" for key, what in DATA_KEYS if saved.get(key) != current.get(key)]


def check_resumable(workdir: str, config: dict, data_identity: dict, defaults: dict | None = None) -> None:
    """ConfigError (one line) if `workdir`'s checkpoints were trained with another config or other data
    (`defaults`: the schema's defaults, for keys newer than the run)."""
    checkpoints = os.path.join(workdir, "checkpoints")
    if not (os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints))):
        return
    saved_config = _read(os.path.join(workdir, "config.json"))
    saved_data = _read(os.path.join(workdir, "data.json"))
    if saved_config is None:
        raise ConfigError(f"--workdir={workdir} has checkpoints but no readable config.json to check them against; "
                          "use a fresh --workdir")
    changed = config_changes(saved_config, config, defaults)
    if changed:
        raise ConfigError(f"--workdir={workdir} was trained with another config: {'; '.join(changed)}; resume "
                          "with the same config (only the step counts, intervals, mesh and kernels may change) "
                          "or use a fresh --workdir")
    changed = data_changes(saved_data, data_identity) if saved_data is not None else []  # None: an older run
    if changed:
        raise ConfigError(f"--workdir={workdir} was trained on other data: {'; '.join(changed)} changed; resume "
                          "with the same data or use a fresh --workdir")
