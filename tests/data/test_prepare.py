"""`python -m data.prepare`: documents of text files, directories, JSONL (plain and gzipped) and Parquet into
ArrayRecord shards of token ids, deterministic whatever the workers, resumable, one line on bad input."""

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import prepare

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _random_texts(rng, n):
    """Documents of awkward lengths (empty included) mixing ASCII, accents, CJK, emoji and newlines."""
    alphabet = list("abc xyz\n\t") + ["é", "ß", "中", "文", "🙂"]
    return ["".join(rng.choice(alphabet, size=int(rng.integers(0, 40)))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A corpus in every input format, and its documents in the order `prepare` must read them."""
    root, rng = tmp_path_factory.mktemp("corpus"), np.random.default_rng(0)
    texts = _random_texts(rng, 23)
    (root / "books" / "deep").mkdir(parents=True)
    expected = []
    for i, name in enumerate(["b.txt", "a.txt", "deep/c.md"]):  # a directory: its files sorted by path
        (root / "books" / name).write_text(texts[i], encoding="utf-8")
    expected += [texts[1], texts[0], texts[2]]
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts[3:10])]
    (root / "part.jsonl").write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n", encoding="utf-8")
    expected += texts[3:10]
    with gzip.open(root / "part.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[10:16])
    expected += texts[10:16]
    pq.write_table(pa.table({"text": texts[16:23], "n": list(range(7))}), root / "part.parquet", row_group_size=3)
    expected += texts[16:23]
    inputs = [str(root / "books"), str(root / "part.jsonl"), str(root / "*.gz"), str(root / "part.parquet")]
    return inputs, [t for t in expected if t], expected  # documents with no tokens are skipped, not re-sharded


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("store") / "one_worker")
    return out, prepare.prepare(corpus[0], out, documents_per_shard=4, workers=1)


def _decoded(out):
    return [bytes(d.astype(np.uint8)).decode("utf-8") for d in prepare.read_documents(out)]


def _sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_every_format_prepares_into_its_documents_in_order(corpus, prepared):
    out, manifest = prepared
    documents = corpus[1]
    assert _decoded(out) == documents
    assert manifest["documents"] == len(documents) and manifest["vocab_size"] == 256 and manifest["dtype"] == "<u2"
    assert manifest["tokens"] == sum(len(d.encode("utf-8")) for d in documents)
    read = corpus[2]  # document i of the input goes to shard i // 4
    assert [s["documents"] for s in manifest["shards"]] == [sum(map(bool, read[i:i + 4])) for i in range(0, len(read), 4)]
    for shard in manifest["shards"]:
        assert _sha256(os.path.join(out, shard["file"])) == shard["sha256"]
    assert json.load(open(os.path.join(out, "manifest.json"))) == manifest


def test_the_same_inputs_give_the_same_bytes_whatever_the_workers_and_a_rerun_changes_nothing(corpus, prepared,
                                                                                               tmp_path):
    out, manifest = prepared
    other = str(tmp_path / "two_workers")
    assert prepare.prepare(corpus[0], other, documents_per_shard=4, workers=2) == manifest
    for shard in manifest["shards"]:
        assert _sha256(os.path.join(other, shard["file"])) == shard["sha256"]
    before = {name: os.stat(os.path.join(other, name)).st_mtime_ns for name in os.listdir(other)}
    assert prepare.prepare(corpus[0], other, documents_per_shard=4, workers=2) == manifest
    assert {name: os.stat(os.path.join(other, name)).st_mtime_ns for name in os.listdir(other)} == before


def test_a_killed_prepare_continues_where_it_stopped(corpus, prepared, tmp_path):
    """What a kill leaves: no manifest, a shard never written, one half-written under its temporary name, and one
    written but not yet noted; the rerun writes exactly those and gives the uninterrupted store's bytes."""
    out, manifest = prepared
    killed = str(tmp_path / "killed")
    shutil.copytree(out, killed)
    os.remove(os.path.join(killed, "manifest.json"))
    os.remove(os.path.join(killed, prepare.shard_name(1)))
    os.remove(os.path.join(killed, ".progress", "00002.json"))
    with open(os.path.join(killed, prepare.shard_name(3)), "r+b") as f:  # torn: a size the note does not match
        f.truncate(100)
    open(os.path.join(killed, prepare.shard_name(4) + ".tmp"), "wb").write(b"half")
    untouched = os.stat(os.path.join(killed, prepare.shard_name(0))).st_mtime_ns
    assert prepare.prepare(corpus[0], killed, documents_per_shard=4, workers=2) == manifest
    assert _decoded(killed) == corpus[1]
    for shard in manifest["shards"]:
        assert _sha256(os.path.join(killed, shard["file"])) == shard["sha256"]
    assert os.stat(os.path.join(killed, prepare.shard_name(0))).st_mtime_ns == untouched


def test_token_width_follows_the_vocabulary():
    assert prepare.token_dtype(256) == np.uint16 and prepare.token_dtype(65536) == np.uint16
    assert prepare.token_dtype(65537) == np.uint32 and prepare.token_dtype(128_256) == np.uint32


def _bad_corpus(tmp_path, case):
    if case == "not utf-8":
        (tmp_path / "x.txt").write_bytes(b"fine\n\xffbad")
        return [str(tmp_path / "x.txt")], f"{tmp_path / 'x.txt'}: not UTF-8 at byte 5"
    if case == "missing field":
        (tmp_path / "x.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
        return [str(tmp_path / "x.jsonl")], f"{tmp_path / 'x.jsonl'}:2: no string field 'text'"
    if case == "not json":
        (tmp_path / "x.jsonl").write_text('{"text": "a"}\n{"text": \n')
        return [str(tmp_path / "x.jsonl")], f"{tmp_path / 'x.jsonl'}:2: not JSON"
    if case == "missing column":
        pq.write_table(pa.table({"body": ["a"]}), tmp_path / "x.parquet")
        return [str(tmp_path / "x.parquet")], f"{tmp_path / 'x.parquet'}: no column 'text'"
    if case == "no match":
        return [str(tmp_path / "nothing*.txt")], "matches no file"
    if case == "empty":
        (tmp_path / "x.txt").write_text("")
        return [str(tmp_path / "x.txt")], "no documents"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["not utf-8", "missing field", "not json", "missing column", "no match", "empty"])
def test_bad_input_is_one_error_naming_the_file(case, tmp_path):
    inputs, message = _bad_corpus(tmp_path, case)
    with pytest.raises((prepare.PrepareError, prepare.corpus_files.CorpusError)) as error:
        prepare.prepare(inputs, str(tmp_path / "out"), documents_per_shard=2)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_folder_of_another_store_and_a_bad_tokenizer_are_refused(corpus, prepared, tmp_path):
    out, _ = prepared
    with pytest.raises(prepare.PrepareError, match="holds a store prepared from other inputs"):
        prepare.prepare(corpus[0][:1], out, documents_per_shard=4)
    with pytest.raises(prepare.PrepareError, match="is not one of byte, sentencepiece:MODEL_FILE"):
        prepare.prepare(corpus[0], str(tmp_path / "out"), tokenizer_spec="bpe")
    with pytest.raises(prepare.PrepareError, match="no such file"):
        prepare.prepare(corpus[0], str(tmp_path / "out"), tokenizer_spec="sentencepiece:no/such.model")


def test_the_command_prepares_and_answers_bad_input_in_one_line(corpus, prepared, tmp_path):
    out, manifest = prepared
    done = subprocess.run([sys.executable, "-m", "data.prepare", f"--input={','.join(corpus[0])}",
                           f"--out={tmp_path / 'cli'}", "--documents_per_shard=4", "--workers=1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{manifest['documents']} documents, {manifest['tokens']} tokens" in done.stdout
    (tmp_path / "bad.txt").write_bytes(b"\xfe")
    bad = subprocess.run([sys.executable, "-m", "data.prepare", f"--input={tmp_path / 'bad.txt'}",
                          f"--out={tmp_path / 'bad'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [f"error: {tmp_path / 'bad.txt'}: not UTF-8 at byte 0"]


def test_the_beam_runner_writes_the_same_shards_and_continues_a_killed_prepare(corpus, prepared, tmp_path):
    """--runner=beam on Beam's DirectRunner: the default runner's manifest and bytes, from a fresh folder and from
    one a kill left with shards missing; bad input is still one line naming the file."""
    pytest.importorskip("apache_beam", reason="the [beam] extra (CI installs every extra)")
    out, manifest = prepared
    fresh = str(tmp_path / "beam")
    assert prepare.prepare(corpus[0], fresh, documents_per_shard=4, runner="beam") == manifest
    for shard in manifest["shards"]:
        assert _sha256(os.path.join(fresh, shard["file"])) == shard["sha256"]
    os.remove(os.path.join(fresh, "manifest.json"))
    os.remove(os.path.join(fresh, prepare.shard_name(2)))
    untouched = os.stat(os.path.join(fresh, prepare.shard_name(0))).st_mtime_ns
    assert prepare.prepare(corpus[0], fresh, documents_per_shard=4, runner="beam") == manifest
    assert _decoded(fresh) == corpus[1]
    assert os.stat(os.path.join(fresh, prepare.shard_name(0))).st_mtime_ns == untouched
    inputs, message = _bad_corpus(tmp_path, "not utf-8")
    with pytest.raises(prepare.PrepareError) as error:
        prepare.prepare(inputs, str(tmp_path / "bad"), documents_per_shard=2, runner="beam")
    assert message in str(error.value) and "\n" not in str(error.value)
