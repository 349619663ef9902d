"""Trains a SentencePiece vocabulary on the training part of a corpus and saves it.

    python scripts/train_sentencepiece.py [--corpus=../shared/data/tinyshakespeare.txt] \
        [--vocab_size=1024] [--output=runs/spm/tinyshakespeare_1024.model]

Only the first `--train_fraction` of the characters (the LM config's training split) is seen, so the
vocabulary leaks nothing of the validation text. Point `config.data.spm_model` at the output.
"""

import io
import os

from absl import app, flags
import sentencepiece

from data import text

_CORPUS = flags.DEFINE_string("corpus", "../shared/data/tinyshakespeare.txt", "Text file (relative to the repo root).")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 1024, "Vocabulary size.")
_TRAIN_FRACTION = flags.DEFINE_float("train_fraction", 0.9, "Leading fraction of the characters to train on.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "SentencePiece model type.")
_OUTPUT = flags.DEFINE_string("output", "runs/spm/tinyshakespeare_1024.model", "Where to write the .model file.")


def train(corpus: str, vocab_size: int, train_fraction: float, model_type: str, output: str) -> str:
    train_text, _ = text.split_text(text.read_corpus(corpus), train_fraction)
    output = text.resolve_path(output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(train_text.splitlines(keepends=False)), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=1.0, byte_fallback=True, remove_extra_whitespaces=False,
        user_defined_symbols=["\n"], minloglevel=2)
    with open(output, "wb") as f:
        f.write(model.getvalue())
    return output


def main(argv):
    del argv
    path = train(_CORPUS.value, _VOCAB_SIZE.value, _TRAIN_FRACTION.value, _MODEL_TYPE.value, _OUTPUT.value)
    tokenizer = text.SentencePieceTokenizer(path)
    sample = text.read_corpus(_CORPUS.value)[:2000]
    print(f"wrote {path}: vocabulary {tokenizer.vocab_size}, {len(sample) / len(tokenizer.encode(sample)):.2f} "
          "characters per token on the corpus's first 2000 characters")


if __name__ == "__main__":
    app.run(main)
