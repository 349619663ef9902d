"""Prompt / response data from a JSON-lines file, for supervised fine-tuning and preference optimisation.

Each line is {"prompt": str, "response": str} and, for preference pairs, "rejected": str (a worse response to
the same prompt). The text tokenizers of data/text.py (bytes, SentencePiece, a Hugging Face tokenizer.json)
turn each into a row

    prompt_ids + response_ids + padding       inputs = row[:-1], targets = row[1:]
    loss_mask = 1 on the targets that are response tokens (the loss on responses only)

right-padded to `seq_len` (0: the longest row), so a prompt's tokens sit where they would without padding and the
causal model reads no padding before a response. With `left_pad_prompts` every prompt is left-padded to the longest
prompt instead, so every response starts at one position (what GRPO's rollouts need; the padding is then context).
A row longer than `seq_len` is an error naming its line. The eval split is `eval_path`'s file, or the last
`eval_fraction` of the lines.
"""

import json
import os

import numpy as np

from data import text
from data.config_fields import ConfigError


def read_lines(path: str) -> list[dict]:
    rows = []
    with open(text.resolve_path(path), encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{number} is not JSON ({e.msg})") from None
            missing = [k for k in ("prompt", "response") if not isinstance(row.get(k), str)]
            if missing:
                raise ConfigError(f"{path}:{number} has no string {' or '.join(map(repr, missing))} "
                                 "(each line: {\"prompt\": ..., \"response\": ...[, \"rejected\": ...]})")
            rows.append(row)
    if not rows:
        raise ConfigError(f"{path} holds no prompt / response lines")
    return rows


def encode(rows: list[dict], tokenizer, key: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prompt ids, `key`'s response ids) per row."""
    return [(tokenizer.encode(r["prompt"]), tokenizer.encode(r[key])) for r in rows]


def to_examples(encoded, seq_len: int, pad_id: int, prompt_len: int = 0, where: str = "line ",
                first_line: int = 1) -> dict[str, np.ndarray]:
    """Rows of seq_len + 1 tokens -> {"inputs", "targets", "loss_mask"} [N, seq_len]; prompt_len > 0 left-pads
    every prompt to it. Errors name `where` and the line (rows are counted from first_line)."""
    n = len(encoded)
    rows = np.full((n, seq_len + 1), pad_id, np.int32)
    response = np.zeros((n, seq_len + 1), np.float32)
    for i, (prompt, answer) in enumerate(encoded):
        start = prompt_len - len(prompt) if prompt_len else 0
        end = start + len(prompt) + len(answer)
        if end > seq_len + 1:
            raise ConfigError(f"{where}{first_line + i}: {len(prompt)} prompt + {len(answer)} response tokens exceed "
                             f"data.seq_len={seq_len} + 1; raise data.seq_len (0: the longest row)")
        rows[i, start:end] = np.concatenate([prompt, answer])
        response[i, start + len(prompt):end] = 1.0
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:], "loss_mask": response[:, 1:]}


def load(config, tokenizer) -> tuple[dict, dict, int]:
    """(train examples, eval examples, seq_len) of a `pairs` config.data, with "rejected_*" keys when the lines
    have rejected responses."""
    lines = read_lines(config.path)
    if config.eval_path:
        train_lines, eval_lines = lines, read_lines(config.eval_path)
    else:
        cut = len(lines) - max(1, int(round(config.eval_fraction * len(lines))))
        if cut < 1:
            raise ConfigError(f"data.path={config.path!r} has {len(lines)} lines: too few to hold out "
                             f"data.eval_fraction={config.eval_fraction} of them")
        train_lines, eval_lines = lines[:cut], lines[cut:]
    paired = all("rejected" in r for r in train_lines + eval_lines)
    keys = ("response", "rejected") if paired else ("response",)
    encoded = {(split, key): encode(split_lines, tokenizer, key) for split, split_lines in
               (("train", train_lines), ("eval", eval_lines)) for key in keys}
    prompt_len = max(len(p) for rows in encoded.values() for p, _ in rows) if config.left_pad_prompts else 0
    longest = max((prompt_len or len(p)) + len(a) for rows in encoded.values() for p, a in rows) - 1
    seq_len = config.seq_len or longest
    splits = {}
    origin = {"train": (config.path, 1), "eval": (config.eval_path, 1) if config.eval_path else (config.path, len(train_lines) + 1)}
    for split in ("train", "eval"):
        where = f"{origin[split][0]} line "
        examples = to_examples(encoded[split, "response"], seq_len, config.pad_id, prompt_len, where, origin[split][1])
        if paired:
            rejected = to_examples(encoded[split, "rejected"], seq_len, config.pad_id, prompt_len, where, origin[split][1])
            examples.update({f"rejected_{k}": v for k, v in rejected.items()})
        splits[split] = examples
    return splits["train"], splits["eval"], seq_len


def validate(config) -> list[str]:
    problems = [] if config.path else ["data.path='' : pass a JSON-lines file of {\"prompt\", \"response\"} lines"]
    for key in ("path", "eval_path"):
        path = config[key]
        if path and not os.path.isfile(text.resolve_path(path)):
            problems.append(f"data.{key}={path!r}: no such file ({text.resolve_path(path)})")
    return problems + text.tokenizer_problems(config)
