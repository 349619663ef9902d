"""The Python-sources corpus: every `.py` file of this interpreter's standard library and of the packages installed
in its environment (the project's dependencies after `pip install -e ".[...]"`), one document per file, prepared
into a token store with data.prepare.

    PYTHONPATH=. python scripts/tools/build_python_corpus.py --out=corpora/python_sources [--workers=2]

Files are taken in order of (root, path inside it), the standard library first; a file is left out when it is not
UTF-8 (the standard library's encoding tests), empty, or over --max_file_bytes (generated tables). The documents
go to OUT/documents.jsonl ({"text", "path"} per line; its SHA-256 names the corpus) and the store to OUT/store.
Running it again rebuilds the same documents and leaves a finished store as it is. What the docs' scaling study
used is recorded in docs/studies/scaling_python.md (documents, bytes, tokens, checksums): a different Python or a
different set of installed packages gives another corpus, which the checksum tells apart.
"""

import hashlib
import json
import os
import sys
import sysconfig

from absl import app, flags

from data import prepare

_OUT = flags.DEFINE_string("out", "corpora/python_sources", "Folder for documents.jsonl and the store.")
_WORKERS = flags.DEFINE_integer("workers", 2, "data.prepare's worker processes.")
_MAX_FILE_BYTES = flags.DEFINE_integer("max_file_bytes", 1 << 20, "Files larger than this are left out.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "byte", "data.prepare's --tokenizer.")


def roots() -> list[tuple[str, str]]:
    """(label, folder): the standard library, then the environment's installed packages."""
    stdlib, purelib = sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]
    return [("stdlib", stdlib), ("site-packages", purelib)]


def source_files(max_file_bytes: int):
    """(label/relative path, absolute path) of every kept `.py` file, in a fixed order."""
    for label, root in roots():
        found = []
        for folder, subfolders, files in os.walk(root):
            # The standard library's own site-packages is another environment's (the purelib root has ours).
            subfolders[:] = sorted(d for d in subfolders if not (label == "stdlib" and d in ("site-packages",
                                                                                              "dist-packages")))
            found += [os.path.join(folder, f) for f in files if f.endswith(".py")]
        for path in sorted(found):
            size = os.path.getsize(path)
            if 0 < size <= max_file_bytes:
                yield f"{label}/{os.path.relpath(path, root)}", path


def write_documents(out: str, max_file_bytes: int) -> dict:
    """OUT/documents.jsonl, one {"text", "path"} per kept file; returns its counts and SHA-256."""
    os.makedirs(out, exist_ok=True)
    path, digest, documents, size, skipped = os.path.join(out, "documents.jsonl"), hashlib.sha256(), 0, 0, 0
    with open(path + ".partial", "w", encoding="utf-8") as f:
        for name, source in source_files(max_file_bytes):
            with open(source, "rb") as g:
                raw = g.read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                skipped += 1
                continue
            line = json.dumps({"text": text, "path": name}, ensure_ascii=False) + "\n"
            f.write(line)
            digest.update(line.encode("utf-8"))
            documents, size = documents + 1, size + len(raw)
    os.replace(path + ".partial", path)
    return {"documents": documents, "text_bytes": size, "not_utf8": skipped, "sha256": digest.hexdigest()}


def main(argv):
    del argv
    summary = write_documents(_OUT.value, _MAX_FILE_BYTES.value)
    manifest = prepare.prepare([os.path.join(_OUT.value, "documents.jsonl")], os.path.join(_OUT.value, "store"),
                               _TOKENIZER.value, workers=_WORKERS.value, show_progress=True)
    summary |= {"python": sys.version.split()[0], "tokens": manifest["tokens"],
                "store_shards_sha256": hashlib.sha256("".join(s["sha256"] for s in manifest["shards"]).encode()).hexdigest()}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    app.run(main)
