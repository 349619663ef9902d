"""The shipped lm-evaluation-harness tasks: three small tasks made from the held-out tenth of the shipped tiny
Shakespeare text (data/files/tinyshakespeare.txt, the part `lm_shakespeare.py` validates on), one per request
type, so a Shakespeare LM can be scored with nothing downloaded.

- `shakespeare_next_line` (multiple choice, loglikelihood): three lines of a speech, then which of four lines
  comes next (the true one and three drawn from elsewhere in the held-out text); acc and acc_norm.
- `shakespeare_complete` (generate_until): two lines and the first half of a third; generate until the newline;
  exact match with the rest of the line.
- `shakespeare_rolling` (loglikelihood_rolling): passages of whole lines, ~600 characters; word and byte
  perplexity, bits per byte.

`write(folder)` makes the JSONL files from the text (seed 0); `load_*` are the tasks' `custom_dataset` loaders
(lm_eval imports this file by its path, so it imports nothing of the project's).
"""

import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = os.path.join(HERE, "..", "..", "..", "data", "files", "tinyshakespeare.txt")
HELD_OUT = 0.9  # lm_shakespeare.py's data.train_fraction: the text after it is held out


def _held_out_lines(text_path: str = TEXT) -> list[str]:
    with open(text_path, encoding="utf-8") as f:
        text = f.read()
    tail = text[int(len(text) * HELD_OUT):]
    return tail[tail.index("\n\n") + 2:].split("\n")  # from the first speech that starts inside it


def _speech_lines(lines: list[str]) -> list[int]:
    """Indices i where lines i-3..i are four lines of one speech (no blank line, no speaker line among them)."""
    spoken = [bool(line) and not line.endswith(":") for line in lines]
    return [i for i in range(3, len(lines)) if all(spoken[i - 3:i + 1])]


def make(text_path: str = TEXT, seed: int = 0) -> dict[str, list[dict]]:
    lines = _held_out_lines(text_path)
    rng = np.random.default_rng(seed)
    candidates = _speech_lines(lines)
    picked = sorted(rng.choice(candidates, size=70, replace=False).tolist())
    next_line = []
    for i in picked[:40]:
        others = rng.choice([j for j in candidates if abs(j - i) > 3], size=3, replace=False)
        choices = [lines[i]] + [lines[j] for j in others]
        order = rng.permutation(4)
        next_line.append({"context": "\n".join(lines[i - 3:i]) + "\n", "choices": [choices[k] for k in order],
                          "label": int(np.argmin(order))})
    complete = []
    for i in picked[40:]:
        cut = len(lines[i]) // 2
        complete.append({"prompt": "\n".join(lines[i - 2:i]) + "\n" + lines[i][:cut], "answer": lines[i][cut:]})
    rolling, start = [], 0
    while len(rolling) < 10 and start < len(lines):
        end = start
        while end < len(lines) and len("\n".join(lines[start:end])) < 600:
            end += 1
        rolling.append({"text": "\n".join(lines[start:end]) + "\n"})
        start = end + 40  # passages apart
    return {"next_line": next_line, "complete": complete, "rolling": rolling}


def write(folder: str = HERE) -> None:
    for name, rows in make().items():
        with open(os.path.join(folder, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _load(name: str, **unused):
    import datasets

    with open(os.path.join(HERE, f"{name}.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_next_line(**kwargs):
    return _load("next_line", **kwargs)


def load_complete(**kwargs):
    return _load("complete", **kwargs)


def load_rolling(**kwargs):
    return _load("rolling", **kwargs)
