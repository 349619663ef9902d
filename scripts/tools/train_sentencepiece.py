"""Trains a SentencePiece vocabulary on the training part of a corpus and saves it.

    python scripts/tools/train_sentencepiece.py [--corpus=data/files/tinyshakespeare.txt] \
        [--vocab_size=1024] [--output=runs/spm/tinyshakespeare_1024.model]

Only the first `--train_fraction` of the characters (the LM config's training split) is seen, so the
vocabulary leaks nothing of the validation text. Point `config.data.spm_model` at the output.
"""

from absl import app, flags

from data import text

_CORPUS = flags.DEFINE_string("corpus", "data/files/tinyshakespeare.txt", "Text file (relative to the repo root).")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 1024, "Vocabulary size.")
_TRAIN_FRACTION = flags.DEFINE_float("train_fraction", 0.9, "Leading fraction of the characters to train on.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "SentencePiece model type.")
_OUTPUT = flags.DEFINE_string("output", "runs/spm/tinyshakespeare_1024.model", "Where to write the .model file.")


def main(argv):
    del argv
    path = text.train_sentencepiece(_CORPUS.value, _VOCAB_SIZE.value, _TRAIN_FRACTION.value, _MODEL_TYPE.value,
                                    _OUTPUT.value)
    tokenizer = text.SentencePieceTokenizer(path)
    sample = text.read_corpus(_CORPUS.value)[:2000]
    print(f"wrote {path}: vocabulary {tokenizer.vocab_size}, {len(sample) / len(tokenizer.encode(sample)):.2f} "
          "characters per token on the corpus's first 2000 characters")


if __name__ == "__main__":
    app.run(main)
