"""Text data: tokenizers round-trip, the 90/10 split by position, packing against an index loop,
clear errors for missing files."""

import os

import chex
import numpy as np
import pytest

import data
from data import text
from experiments.training import validation
from tests.conftest import make_tiny_lm_config

CORPUS = text.resolve_path(data.TextConfig.path)


def test_the_shipped_corpus_is_there():
    assert os.path.isfile(CORPUS), f"tests read the tiny-Shakespeare corpus from {CORPUS} (data/files/)"
    assert len(text.read_corpus(CORPUS)) == 1_115_394


def test_byte_tokenizer_round_trips_non_ascii():
    tok = text.ByteTokenizer()
    sample = "Thou art — naïve, ἀγαθός!\n"
    ids = tok.encode(sample)
    assert ids.dtype == np.int32 and ids.max() < 256 and len(ids) == len(sample.encode("utf-8"))
    assert tok.decode(ids) == sample


def test_split_is_by_position():
    corpus = text.read_corpus(CORPUS)
    train, validation_text = text.split_text(corpus, 0.9)
    assert train + validation_text == corpus and len(train) == int(0.9 * len(corpus))


@pytest.mark.parametrize("seq_len,stride", [(7, 0), (5, 3), (1, 0)])
def test_pack_matches_an_index_loop(seq_len, stride):
    ids = np.random.default_rng(0).integers(0, 256, 103).astype(np.int32)
    packed = text.pack(ids, seq_len, stride)
    step = stride or seq_len
    starts = list(range(0, len(ids) - seq_len, step))
    chex.assert_shape([packed["inputs"], packed["targets"]], (len(starts), seq_len))
    for row, start in enumerate(starts):
        for i in range(seq_len):
            assert packed["inputs"][row, i] == ids[start + i]
            assert packed["targets"][row, i] == ids[start + i + 1]
    assert (packed["loss_mask"] == 1).all()


def _train_spm(tmp_path, vocab_size: int) -> str:
    """A SentencePiece model trained (as scripts/tools/train_sentencepiece.py does) on the corpus's train split."""
    return text.train_sentencepiece(CORPUS, vocab_size, 0.9, "bpe", str(tmp_path / "spm.model"))


def test_sentencepiece_round_trips(tmp_path):
    tok = text.SentencePieceTokenizer(_train_spm(tmp_path, 400))
    sample = text.read_corpus(CORPUS)[-3000:]  # validation text, unseen by the vocabulary
    ids = tok.encode(sample)
    assert tok.vocab_size == 400 and len(ids) < len(sample) and tok.decode(ids) == sample


def hf_tokenizer_json(folder, kind: str, vocab_size: int = 320) -> str:
    """A Hugging Face tokenizer.json trained by `tokenizers` on the corpus's first 30k characters: GPT-2's
    byte-level BPE, or the SentencePiece-style BPE (metaspace pre-tokenization)."""
    tokenizers = pytest.importorskip("tokenizers", reason="needs the [hf] extra")
    cls = {"byte_bpe": tokenizers.ByteLevelBPETokenizer, "sentencepiece_bpe": tokenizers.SentencePieceBPETokenizer}[kind]
    tokenizer = cls()
    tokenizer.train_from_iterator([text.read_corpus(CORPUS)[:30_000]], vocab_size=vocab_size, show_progress=False,
                                  **({"min_frequency": 1} if kind == "byte_bpe" else {}))
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    return str(folder)


@pytest.mark.parametrize("kind", ["byte_bpe", "sentencepiece_bpe"])
def test_hugging_face_tokenizers_feed_the_text_pipeline(tmp_path, kind):
    from tokenizers import Tokenizer

    folder = hf_tokenizer_json(tmp_path, kind)
    config = make_tiny_lm_config()
    config.data.update(tokenizer="hf", tokenizer_file=folder)
    validation.validate(config, 8)
    splits = data.load(config.data, seed=0)
    reference = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    train_text, _ = text.split_text(text.read_corpus(CORPUS), config.data.train_fraction)
    ids = reference.encode(train_text).ids
    assert splits.vocab_size == reference.get_vocab_size() and splits.chars_per_token > 1.2
    np.testing.assert_array_equal(splits.train["inputs"][0], ids[:config.data.seq_len])
    np.testing.assert_array_equal(splits.train["inputs"][1], ids[config.data.seq_len:2 * config.data.seq_len])
    tok = text.tokenizer_for(config.data)
    sample = "ROMEO:\nBut, soft! what light?"
    assert tok.decode(tok.encode(sample)).strip() == sample or kind == "sentencepiece_bpe"  # metaspace drops "\n"
    assert len(data.identity(config.data, splits)["tokenizer_sha256"]) == 64


def test_loader_reports_chars_per_token_and_vocab():
    config = make_tiny_lm_config()
    splits = data.load(config.data, seed=0)
    assert splits.vocab_size == 256 and splits.seq_len == config.data.seq_len
    assert splits.chars_per_token == pytest.approx(1.0, abs=1e-3)  # one byte per character: ASCII
    np.testing.assert_array_equal(splits.train["targets"][:, :-1], splits.train["inputs"][:, 1:])


@pytest.mark.parametrize("override,message", [
    (dict(path="no/such/corpus.txt"), "data.path='no/such/corpus.txt': no such file"),
    (dict(tokenizer="sentencepiece", spm_model="missing.model"), "data.spm_model='missing.model': no such file"),
    (dict(tokenizer="words"), "data.tokenizer='words' is not one of"),
    (dict(tokenizer="hf", tokenizer_file="no/such/dir"), "data.tokenizer_file='no/such/dir': no tokenizer.json there"),
    (dict(source="tfds"), "data.source='tfds' is not one of"),
    (dict(train_fraction=1.0), "data.train_fraction=1.0 must lie in (0, 1)"),
])
def test_bad_text_config_is_one_clear_line(override, message):
    config = make_tiny_lm_config()
    config.data.update(**override)
    with pytest.raises(validation.ConfigError) as info:
        validation.validate(config, 8)
    assert message in str(info.value) and "\n" not in str(info.value)
