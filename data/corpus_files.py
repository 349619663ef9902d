"""The documents of a corpus, read from its files in a fixed order: what `data.prepare` tokenizes.

    input patterns --expand--> files (each pattern's matches sorted; a directory: every file under it, sorted)
    file --read--> documents, each with the input position after it (bytes of the files before + bytes read)

Per file, by name:
    *.jsonl, *.jsonl.gz   one document per line: the string in the field `text_field` (blank lines skipped)
    *.parquet             one document per row: the string column `text_field` (pyarrow, the `corpora` extra)
    anything else         one document: the whole file, UTF-8

Bad input raises `CorpusError` with one line naming the file: unreadable, not UTF-8 (with the byte offset),
a line that is not JSON or lacks the field (with its line number), a missing column.
"""

import glob
import gzip
import json
import os
from collections.abc import Iterator


class CorpusError(ValueError):
    """A corpus file that cannot be read as documents; the message names the file and what is wrong."""


def expand(patterns: list[str]) -> list[str]:
    """The files the input patterns name, in the order given (each pattern's matches sorted), without repeats."""
    files = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            matches = sorted(os.path.join(root, name) for root, _, names in os.walk(pattern) for name in names)
        else:
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise CorpusError(f"--input={pattern!r} matches no file")
        files += [m for m in matches if m not in files]
    return files


def documents(path: str, text_field: str = "text") -> Iterator[tuple[str, int]]:
    """(document, bytes of `path` read so far) for each document of the file, in order."""
    try:
        if path.endswith((".jsonl", ".jsonl.gz")):
            yield from _jsonl_documents(path, text_field)
        elif path.endswith(".parquet"):
            yield from _parquet_documents(path, text_field)
        else:
            with open(path, "rb") as f:
                content = f.read()
            yield _decoded(content, path, 0), len(content)
    except OSError as error:
        raise CorpusError(f"{path}: cannot be read ({error.strerror or error})") from error


def _decoded(content: bytes, path: str, offset: int) -> str:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CorpusError(f"{path}: not UTF-8 at byte {offset + error.start}") from error


def _jsonl_documents(path: str, text_field: str) -> Iterator[tuple[str, int]]:
    with open(path, "rb") as raw:
        lines = gzip.open(raw) if path.endswith(".gz") else raw
        offset = 0  # of the line in the (uncompressed) content, for the UTF-8 error
        for number, line in enumerate(lines, 1):
            record = _json_line(_decoded(line, path, offset), path, number)
            offset += len(line)
            if record is None:
                continue
            value = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                raise CorpusError(f"{path}:{number}: no string field {text_field!r} (set --text_field)")
            yield value, raw.tell()


def _json_line(line: str, path: str, number: int):
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise CorpusError(f"{path}:{number}: not JSON ({error.msg})") from error


def _parquet_documents(path: str, text_field: str) -> Iterator[tuple[str, int]]:
    try:
        import pyarrow.parquet as pq  # the `corpora` extra
    except ImportError as error:
        raise CorpusError(f"{path}: reading Parquet needs pyarrow: pip install -e '.[corpora]'") from error
    try:
        table = pq.ParquetFile(path)
    except Exception as error:  # pyarrow's ArrowInvalid and friends
        raise CorpusError(f"{path}: not a Parquet file ({str(error).splitlines()[0]})") from error
    if text_field not in table.schema_arrow.names:
        raise CorpusError(f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names}; set --text_field)")
    size, rows, done = os.path.getsize(path), max(table.metadata.num_rows, 1), 0
    for batch in table.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            done += 1
            if not isinstance(value, str):
                raise CorpusError(f"{path}: row {done - 1} of column {text_field!r} is not a string")
            yield value, size * done // rows
