"""Language-modelling data from a text file: tokenize, split, pack into fixed-length examples.

    text --tokenizer--> ids[0..N)      train = the first `train_fraction` of the characters,
                                       validation = the rest (nanoGPT's 90% / 10% split)
    example j = window ids[j*L : j*L + L + 1]:  inputs = window[:-1], targets = window[1:]

Windows start every `stride` tokens (default L: packed, no overlap) and every position is scored.
Three tokenizers: bytes (UTF-8, vocabulary 256, no file), SentencePiece (a model file trained by
`scripts/tools/train_sentencepiece.py`) and a Hugging Face `tokenizer.json` read by the `tokenizers` package (the
byte-level BPE of GPT-2, Llama-3 and Qwen2, or a converted SentencePiece model: what an imported checkpoint
ships; experiments/import_hf.py points its run folder at it).
"""

import io
import os

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_path(path: str) -> str:
    """Relative paths are relative to the repository root, so configs work from any directory."""
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(REPO_ROOT, path))


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, np.uint8).tolist()).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A trained SentencePiece model (`*.model`)."""

    def __init__(self, model_path: str):
        import sentencepiece  # imported here: only this tokenizer needs it

        self.model_path = model_path
        self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = self._sp.get_piece_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), np.int32)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


def train_sentencepiece(corpus: str, vocab_size: int, train_fraction: float, model_type: str, output: str) -> str:
    """Trains a SentencePiece model on the first `train_fraction` of the corpus; returns its path.

    Byte fallback keeps every string encodable; whitespace and newlines are kept as they are."""
    import sentencepiece

    train_text, _ = split_text(read_corpus(corpus), train_fraction)
    output = resolve_path(output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(train_text.splitlines(keepends=False)), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=1.0, byte_fallback=True, remove_extra_whitespaces=False,
        user_defined_symbols=["\n"], minloglevel=2)
    with open(output, "wb") as f:
        f.write(model.getvalue())
    return output


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (a file, or a checkpoint folder holding one), through `tokenizers`."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer  # imported here: only this tokenizer needs it (the [hf] extra)

        self.path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        self._tokenizer = Tokenizer.from_file(self.path)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def tokenizer(kind: str, model_file: str = ""):
    """The tokenizer `kind` ("byte", "sentencepiece", "hf") with its file (data.spm_model / data.tokenizer_file)."""
    if kind == "byte":
        return ByteTokenizer()
    return (SentencePieceTokenizer if kind == "sentencepiece" else HFTokenizer)(resolve_path(model_file))


def tokenizer_for(data_config):
    """The tokenizer a text `config.data` names."""
    kind = data_config.tokenizer
    return tokenizer(kind, data_config.tokenizer_file if kind == "hf" else data_config.spm_model)


def tokenizer_file(data_config) -> str:
    """The file the tokenizer reads ("" for bytes)."""
    path = {"sentencepiece": data_config.spm_model, "hf": data_config.get("tokenizer_file", "")}.get(data_config.tokenizer)
    if not path:
        return ""
    path = resolve_path(path)
    return os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path


def read_corpus(path: str) -> str:
    with open(resolve_path(path), encoding="utf-8") as f:
        return f.read()


def split_text(text: str, train_fraction: float) -> tuple[str, str]:
    """(train, validation): the first `train_fraction` of the characters, then the rest."""
    cut = int(len(text) * train_fraction)
    return text[:cut], text[cut:]


def pack(ids: np.ndarray, seq_len: int, stride: int = 0) -> dict[str, np.ndarray]:
    """Windows of seq_len + 1 tokens every `stride` (0: seq_len) -> {"inputs", "targets", "loss_mask"} [N, L]."""
    stride = stride or seq_len
    starts = np.arange(0, len(ids) - seq_len, stride)
    windows = ids[starts[:, None] + np.arange(seq_len + 1)]
    return {"inputs": windows[:, :-1].astype(np.int32), "targets": windows[:, 1:].astype(np.int32),
            "loss_mask": np.ones((len(starts), seq_len), np.float32)}


def validate(config) -> list[str]:
    """Problems with `config.data` for text, as one-line messages (empty when fine)."""
    problems = []
    if not os.path.isfile(resolve_path(config.path)):
        problems.append(f"data.path={config.path!r}: no such file ({resolve_path(config.path)})")
    if config.tokenizer == "hf" and config.source == "seqio":
        problems.append("data.tokenizer='hf' with data.source='seqio': seqio has no Hugging Face vocabulary; use "
                        "data.source='grain'")
    return problems + tokenizer_problems(config)


def tokenizer_problems(config) -> list[str]:
    """A missing tokenizer file of a `config.data` that names one (text, pairs), as one-line messages."""
    if config.tokenizer == "sentencepiece" and not os.path.isfile(resolve_path(config.spm_model)):
        return [f"data.spm_model={config.spm_model!r}: no such file; train one with "
                f"`python scripts/tools/train_sentencepiece.py --output={config.spm_model or 'PATH.model'}`"]
    if config.tokenizer == "hf" and not os.path.isfile(tokenizer_file(config)):
        return [f"data.tokenizer_file={config.tokenizer_file!r}: no tokenizer.json there; pass a Hugging Face "
                "checkpoint folder or its tokenizer.json"]
    return []
