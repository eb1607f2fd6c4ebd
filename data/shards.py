"""Token shards: the on-disk format, the distributed training loader and validation batches.

Shard format (the one used by the public FineWeb GPT-2 shards):
  bytes [0, 1024)   header, 256 little-endian int32: [0] magic 20240520, [1] version 1, [2] token count N
  bytes [1024, ...) N token ids as little-endian uint16. GPT-2 shards: ids < 50257, every document starts with
                    50256 (<|endoftext|>). Byte-level shards (data/tokenize_text.py --tokenizer bytes): ids are
                    the UTF-8 bytes 1..255, every document starts with 0.
"""

from __future__ import annotations

import glob
import os
import uuid
import warnings
from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
    import torch

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4  # 1024
TOKEN_DTYPE = np.dtype("<u2")  # uint16 little-endian
GPT2_BOS_ID = 50256  # <|endoftext|>, prefixed to every document
GPT2_VOCAB_SIZE = 50257
BYTES_BOS_ID = 0  # byte-level shards: the NUL byte marks a document start (removed from the text itself)
BYTES_VOCAB_SIZE = 256
BOS_SCAN_TOKENS = 1 << 20  # BOS positions are found in windows of this many tokens (2 MB of uint16)

_FIX_HINT = (
    "The file is truncated or not a token shard: delete it and re-download it "
    "(python data/cached_fineweb10B.py N) or re-tokenize it (python data/tokenize_text.py / "
    "python data/prepare_demo_data.py --force)."
)


class ShardFormatError(ValueError):
    """A file does not follow the shard format (bad magic, version or size)."""


class ShardsNotFoundError(FileNotFoundError, ValueError):
    """No file matches a shard pattern (also a ValueError: it is a bad argument)."""


# ----------------------------------------------------------------------------------------------
# Format


def write_shard(path: str | os.PathLike, tokens) -> str:
    """Write a 1-D sequence of token ids (each in [0, 65536)) as a shard; atomic (tmp file + os.replace)."""
    path = os.fspath(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"write_shard({path!r}): tokens must be 1-D, got shape {arr.shape}; flatten them first.")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"write_shard({path!r}): tokens must be integers, got dtype {arr.dtype}.")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= 2**16):
        raise ValueError(
            f"write_shard({path!r}): token ids must lie in [0, 65536) to fit uint16, found range "
            f"[{int(arr.min())}, {int(arr.max())}]; use a tokenizer with fewer than 65536 ids."
        )
    if arr.size >= 2**31:
        raise ValueError(f"write_shard({path!r}): {arr.size} tokens exceed the int32 header; split into shards.")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, arr.size
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # A unique temp name in the same folder (same file system, so os.replace is atomic); plain open()
    # so that the file gets the usual permissions.
    tmp_path = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp_path, "xb") as f:
            f.write(header.tobytes())
            f.write(arr.astype(TOKEN_DTYPE, copy=False).tobytes())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    return path


def read_header(path: str | os.PathLike) -> int:
    """Check a shard's header and size; return its token count. Raises ShardFormatError."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ShardFormatError(
            f"{path}: expected a header of {HEADER_BYTES} bytes, found a file of only {size} bytes. {_FIX_HINT}"
        )
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, num_tokens = int(header[0]), int(header[1]), int(header[2])
    if magic != SHARD_MAGIC:
        raise ShardFormatError(f"{path}: expected magic number {SHARD_MAGIC}, found {magic}. {_FIX_HINT}")
    if version != SHARD_VERSION:
        raise ShardFormatError(
            f"{path}: expected shard format version {SHARD_VERSION}, found {version}. "
            f"Re-tokenize or re-download it with this project's tools."
        )
    expected_size = HEADER_BYTES + TOKEN_DTYPE.itemsize * num_tokens
    if num_tokens < 0 or size != expected_size:
        raise ShardFormatError(
            f"{path}: header says {num_tokens} tokens, so the file should be {expected_size} bytes, "
            f"found {size} bytes. {_FIX_HINT}"
        )
    return num_tokens


def read_shard(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """Return the tokens of a shard as a 1-D uint16 array (read-only memmap unless mmap=False)."""
    path = os.fspath(path)
    num_tokens = read_header(path)
    if num_tokens == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    if mmap:
        return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        return np.fromfile(f, dtype=TOKEN_DTYPE, count=num_tokens)


def list_shards(pattern: str | os.PathLike) -> list[str]:
    """Sorted paths matching a glob pattern; ShardsNotFoundError (naming the pattern) if there are none."""
    pattern = os.fspath(pattern)
    paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    if not paths:
        raise ShardsNotFoundError(
            f"no shard files match {pattern!r} (working directory {os.getcwd()}). "
            "Download FineWeb with `python data/cached_fineweb10B.py N` (N train shards) or build the "
            "small demo set with `python data/prepare_demo_data.py`, then pass a matching glob."
        )
    return paths


def _read_span(paths: list[str], counts: list[int], start: int, length: int) -> np.ndarray:
    """Tokens [start, start+length) of the concatenation of the shards `paths` (token counts `counts`)."""
    pieces, offset = [], 0
    for path, count in zip(paths, counts):
        lo, hi = max(start - offset, 0), min(start + length - offset, count)
        if lo < hi:
            pieces.append(np.asarray(read_shard(path)[lo:hi]))
        offset += count
        if offset >= start + length:
            break
    out = np.concatenate(pieces) if pieces else np.zeros(0, dtype=TOKEN_DTYPE)
    assert out.size == length, "span beyond the end of the files"  # callers check the total first
    return out


def _to_device(rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) token rows -> int64 (inputs, targets), each (B, T), on `device`."""
    import torch  # imported where tensors are made: the format and download tools run without torch

    rows = rows.astype(np.int64)
    inputs = torch.from_numpy(np.ascontiguousarray(rows[:, :-1]))
    targets = torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))
    if device.type == "cuda":  # page-locked host memory lets the copy overlap with compute
        return (inputs.pin_memory().to(device, non_blocking=True),
                targets.pin_memory().to(device, non_blocking=True))
    return inputs.to(device), targets.to(device)


def _as_device(device: str | torch.device) -> torch.device:
    import torch

    return torch.device(device)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _check_rank(rank, world_size) -> tuple[int, int]:
    world_size = _check_positive_int("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}.")
    return int(rank), world_size


# ----------------------------------------------------------------------------------------------
# Training loader


class DistributedTokenLoader:
    """Training batches from shards, split over ranks by global chunk index.

    The token stream (shards in sorted order, cycled forever) is cut into rows of seq_len + 1 tokens
    (inputs = row[:-1], targets = row[1:]). A row never crosses a shard boundary. Consecutive rows
    share one token: the cursor advances by seq_len (contiguous rows: every token is a target once).
      align_to_bos=True:  a row starts at the first BOS token at or after the cursor (the rest of a
                          document longer than a row is skipped); a row may run across documents.
      align_to_bos=False: rows are contiguous.
    A chunk is batch_size consecutive rows; global chunk k belongs to rank k % world_size. Every call
    of next_batch() walks one round of world_size chunks and returns the rank's own, so all ranks keep
    the same cursor, and 1 process x 2 calls sees exactly the chunks of 2 processes x 1 call.
    When the stream passes the end of the last shard it starts again at the first (epoch += 1),
    with a warning the first time.

    sample_seed=None reads the stream as above. sample_seed=S draws every row at random instead (with
    replacement): the rows of global chunk k start at positions drawn by numpy default_rng([S, k]), uniform over
    every start that leaves a whole row inside its shard (with align_to_bos: moved to the next BOS, redrawn if
    the row would not fit). Rows are then independent samples of the data, so even a small batch (or each
    micro-batch of a step) mixes many documents; the chunk index alone fixes them, so the rank split and resume
    work as in stream mode, and the same S gives the same rows to every run.
    """

    def __init__(self, pattern: str, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 align_to_bos: bool = True, bos_id: int = GPT2_BOS_ID, device: str | torch.device = "cpu",
                 sample_seed: int | None = None):
        self.batch_size = _check_positive_int("batch_size", batch_size)
        self.seq_len = _check_positive_int("seq_len", seq_len)
        self.rank, self.world_size = _check_rank(rank, world_size)
        if not 0 <= int(bos_id) < 2**16:
            raise ValueError(f"bos_id must be a token id in [0, 65536), got {bos_id!r}.")
        self.bos_id = int(bos_id)
        self.align_to_bos = bool(align_to_bos)
        self.device = _as_device(device)
        self.pattern = os.fspath(pattern)
        self.paths = list_shards(self.pattern)
        self.counts = [read_header(p) for p in self.paths]  # checks every header up front
        row_len = self.seq_len + 1
        if max(self.counts) < row_len:
            raise ValueError(
                f"every shard matching {self.pattern!r} holds fewer than seq_len + 1 = {row_len} tokens "
                f"(largest: {max(self.counts)}); use a smaller seq_len or more data per shard."
            )
        # Stream position (identical on every rank).
        self.shard_index = 0
        self.position = 0  # cursor inside the current shard, in tokens
        self.chunks_consumed = 0  # global chunks walked so far (all ranks together)
        self.epoch = 0  # completed passes over all shards
        self._warned_wrap = False
        self._tokens: np.ndarray | None = None  # current shard (memmap)
        # BOS indices of the current shard within the scanned window [lo, hi): found lazily, window by
        # window, so a shard switch costs no full scan of the shard (100M tokens would take ~1 s).
        self._bos_window = (0, 0)
        self._bos_positions = np.zeros(0, dtype=np.int64)
        if sample_seed is not None and (isinstance(sample_seed, bool) or not isinstance(sample_seed, (int, np.integer))
                                        or sample_seed < 0):
            raise ValueError(f"sample_seed must be None (read the stream in order) or an integer >= 0, "
                             f"got {sample_seed!r}.")
        self.sample_seed = None if sample_seed is None else int(sample_seed)
        # random rows: the number of row starts in each shard, their running total, opened shards, BOS indices
        self._starts = np.array([max(n - row_len + 1, 0) for n in self.counts], dtype=np.int64)
        self._starts_before = np.concatenate([[0], np.cumsum(self._starts)])
        self._opened: dict[int, np.ndarray] = {}
        self._bos_index: dict[int, np.ndarray] = {}
        self.last_row_starts: list[tuple[int, int]] = []

    # -- stream walking --

    def _load_current_shard(self) -> None:
        self._tokens = read_shard(self.paths[self.shard_index])
        self._bos_window = (0, 0)

    def _next_bos(self, position: int) -> int:
        """Index of the first BOS at or after position in the current shard (its length if none)."""
        n = len(self._tokens)
        while position < n:
            lo, hi = self._bos_window
            if not lo <= position < hi:
                lo, hi = position, min(n, position + BOS_SCAN_TOKENS)
                self._bos_window = (lo, hi)
                self._bos_positions = lo + np.flatnonzero(self._tokens[lo:hi] == self.bos_id)
            i = int(np.searchsorted(self._bos_positions, position, side="left"))
            if i < len(self._bos_positions):
                return int(self._bos_positions[i])
            position = hi
        return n

    def _advance_shard(self) -> None:
        self.shard_index += 1
        self.position = 0
        if self.shard_index == len(self.paths):
            self.shard_index = 0
            self.epoch += 1
        self._load_current_shard()

    def _next_row_start(self) -> tuple[int, int]:
        """Return (shard_index, start) of the next row and move the cursor past it."""
        row_len = self.seq_len + 1
        if self._tokens is None:
            self._load_current_shard()
        for _ in range(len(self.paths) + 1):
            n = len(self._tokens)
            start = self._next_bos(self.position) if self.align_to_bos else self.position
            if start + row_len <= n:
                self.position = start + self.seq_len
                return self.shard_index, start
            self._advance_shard()
        raise ValueError(
            f"no shard matching {self.pattern!r} has a row of {row_len} tokens starting at a BOS token "
            f"(id {self.bos_id}); check bos_id, use a smaller seq_len or align_to_bos=False."
        )

    def _shard_tokens(self, shard: int) -> np.ndarray:
        if shard not in self._opened:
            self._opened[shard] = read_shard(self.paths[shard])
        return self._opened[shard]

    def _random_row_starts(self, chunk: int) -> list[tuple[int, int]]:
        """(shard_index, start) of the batch_size random rows of global chunk `chunk` (see the class docstring)."""
        row_len = self.seq_len + 1
        rng = np.random.default_rng([self.sample_seed, chunk])
        rows = []
        for _ in range(1000 * self.batch_size):
            if len(rows) == self.batch_size:
                return rows
            draw = int(rng.integers(self._starts_before[-1]))
            shard = int(np.searchsorted(self._starts_before, draw, side="right")) - 1
            start = draw - int(self._starts_before[shard])
            if self.align_to_bos:
                if shard not in self._bos_index:
                    self._bos_index[shard] = np.flatnonzero(self._shard_tokens(shard) == self.bos_id)
                bos = self._bos_index[shard]
                i = int(np.searchsorted(bos, start))
                if i == len(bos) or bos[i] + row_len > self.counts[shard]:
                    continue  # no whole row from a BOS at or after the draw: draw again
                start = int(bos[i])
            rows.append((shard, start))
        raise ValueError(
            f"could not draw rows of {row_len} tokens starting at a BOS token (id {self.bos_id}) from the shards "
            f"matching {self.pattern!r}; check bos_id, use a smaller seq_len or align_to_bos=False.")

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (inputs, targets), int64 tensors of shape (batch_size, seq_len) on the loader's device."""
        own: list[tuple[int, int]] = []
        for chunk in range(self.world_size):  # one round: chunk k of the round belongs to rank k
            if self.sample_seed is None:
                rows = [self._next_row_start() for _ in range(self.batch_size)]
            elif chunk == self.rank:
                rows = self._random_row_starts(self.chunks_consumed + chunk)
            if chunk == self.rank:
                own = rows
        self.last_row_starts = own  # (shard index, start token) of each row just returned, for inspection
        self.chunks_consumed += self.world_size
        if self.epoch > 0 and not self._warned_wrap:
            self._warned_wrap = True
            warnings.warn(
                f"DistributedTokenLoader: reached the end of the {len(self.paths)} shard(s) matching "
                f"{self.pattern!r} and started again from the first (epoch {self.epoch}); data now repeats.",
                RuntimeWarning, stacklevel=2)
        row_len = self.seq_len + 1
        batch = np.empty((self.batch_size, row_len), dtype=TOKEN_DTYPE)
        for b, (shard, start) in enumerate(own):
            if self.sample_seed is None:
                tokens = self._tokens if shard == self.shard_index else read_shard(self.paths[shard])
            else:
                tokens = self._shard_tokens(shard)
            batch[b] = tokens[start:start + row_len]
        return _to_device(batch, self.device)

    # -- resume --

    def state_dict(self) -> dict:
        """The stream position (the same on every rank; plain ints and strings)."""
        return {
            "format": "DistributedTokenLoader/1",
            "shards": [os.path.basename(p) for p in self.paths],
            "shard_index": self.shard_index,
            "position": self.position,
            "chunks_consumed": self.chunks_consumed,
            "epoch": self.epoch,
            "align_to_bos": self.align_to_bos,
            "bos_id": self.bos_id,
            "sample_seed": self.sample_seed,
            "warned_wrap": self._warned_wrap,
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue from a saved position. The position is a token cursor, so batch_size, seq_len and
        world_size may differ from the saved run. strict=True requires the same shard file names;
        strict=False only needs the current shard to exist (the run then continues on a changed file set)."""
        if state.get("format") != "DistributedTokenLoader/1":
            raise ValueError(f"not a DistributedTokenLoader state (format {state.get('format')!r}).")
        for key in ("align_to_bos", "bos_id", "sample_seed"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader uses "
                                 f"{getattr(self, key)!r}; construct the loader with the saved setting.")
        names = [os.path.basename(p) for p in self.paths]
        saved_name = state["shards"][state["shard_index"]]
        if strict and names != list(state["shards"]):
            missing = sorted(set(state["shards"]) - set(names))
            extra = sorted(set(names) - set(state["shards"]))
            raise ValueError(
                f"the shards matching {self.pattern!r} differ from the saved run (missing: {missing[:5]}, "
                f"new: {extra[:5]}); an exact resume needs the same files. Pass strict=False to continue anyway.")
        if saved_name not in names:
            raise ValueError(f"the saved current shard {saved_name!r} does not match {self.pattern!r}.")
        self.shard_index = names.index(saved_name)
        self.position = int(state["position"])
        self.chunks_consumed = int(state["chunks_consumed"])
        self.epoch = int(state["epoch"])
        self._warned_wrap = bool(state.get("warned_wrap", self.epoch > 0))
        self._load_current_shard()


class PackedDocumentLoader:
    """Training batches of whole documents packed into one row per rank (record 18's loader).

    Documents are the spans from one BOS token to the next, each cut to at most max_doc_tokens tokens (the rest
    of a longer document is skipped). next_batch(tokens) walks world_size consecutive runs of documents from the
    stream; run r (rank r's) takes documents until it holds exactly tokens + 1 tokens, cutting its last document
    short, and the next run starts at the next document. Inputs are run[:-1], targets run[1:], so every row starts
    at a BOS and attention can be masked per document. All ranks keep the same cursor, and a world size that
    divides the forwards per step sees the same runs (1 process x 2 calls = 2 processes x 1 call). `tokens` may
    change between calls (batch-size schedule). When the current shard has too few documents left for a whole
    call, the call starts again at the first document of the next shard (cycling, epoch += 1 after the last,
    with a warning the first time). BOS positions of a shard are indexed when the shard is opened.
    """

    def __init__(self, pattern: str, rank: int = 0, world_size: int = 1, max_doc_tokens: int = 4096,
                 bos_id: int = GPT2_BOS_ID, device: str | torch.device = "cpu"):
        self.rank, self.world_size = _check_rank(rank, world_size)
        self.max_doc_tokens = _check_positive_int("max_doc_tokens", max_doc_tokens)
        if not 0 <= int(bos_id) < 2**16:
            raise ValueError(f"bos_id must be a token id in [0, 65536), got {bos_id!r}.")
        self.bos_id = int(bos_id)
        self.device = _as_device(device)
        self.pattern = os.fspath(pattern)
        self.paths = list_shards(self.pattern)
        self.counts = [read_header(p) for p in self.paths]  # checks every header up front
        self.shard_index = 0
        self.doc_index = 0  # next document of the current shard
        self.epoch = 0
        self._warned_wrap = False
        self._tokens: np.ndarray | None = None
        self._bos = np.zeros(0, dtype=np.int64)

    def _open_shard(self) -> None:
        self._tokens = read_shard(self.paths[self.shard_index])
        self._bos = np.flatnonzero(np.asarray(self._tokens) == self.bos_id)

    def _next_shard(self) -> None:
        self.shard_index, self.doc_index = self.shard_index + 1, 0
        if self.shard_index == len(self.paths):
            self.shard_index, self.epoch = 0, self.epoch + 1
        self._open_shard()

    def _take_run(self, doc: int, length: int) -> tuple[list[tuple[int, int]], int] | None:
        """Spans [(start, end)] of documents from `doc` on that hold exactly `length` tokens, and the next
        document; None if the shard ends first."""
        spans, held = [], 0
        while held < length:
            if doc >= len(self._bos):
                return None
            start = int(self._bos[doc])
            doc_end = int(self._bos[doc + 1]) if doc + 1 < len(self._bos) else len(self._tokens)
            end = min(doc_end, start + self.max_doc_tokens, start + length - held)
            spans.append((start, end))
            held += end - start
            doc += 1
        return spans, doc

    def next_batch(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets): int64 tensors of shape (1, tokens) on the loader's device."""
        tokens = _check_positive_int("tokens", tokens)
        if self._tokens is None:
            self._open_shard()
        for _ in range(len(self.paths) + 1):
            runs, doc = [], self.doc_index
            for _ in range(self.world_size):
                taken = self._take_run(doc, tokens + 1)
                if taken is None:
                    break
                spans, doc = taken
                runs.append(spans)
            if len(runs) == self.world_size:
                break
            self._next_shard()
        else:
            raise ValueError(f"no shard matching {self.pattern!r} holds {self.world_size} x {tokens + 1} tokens of "
                             f"documents starting at BOS (id {self.bos_id}); use fewer tokens per forward or more data.")
        self.doc_index = doc
        if self.epoch > 0 and not self._warned_wrap:
            self._warned_wrap = True
            warnings.warn(f"PackedDocumentLoader: reached the end of the {len(self.paths)} shard(s) matching "
                          f"{self.pattern!r} and started again from the first (epoch {self.epoch}); data now repeats.",
                          RuntimeWarning, stacklevel=2)
        row = np.concatenate([self._tokens[a:b] for a, b in runs[self.rank]])
        return _to_device(row[None], self.device)

    def state_dict(self) -> dict:
        return {"format": "PackedDocumentLoader/1", "shards": [os.path.basename(p) for p in self.paths],
                "shard_index": self.shard_index, "doc_index": self.doc_index, "epoch": self.epoch,
                "max_doc_tokens": self.max_doc_tokens, "bos_id": self.bos_id, "warned_wrap": self._warned_wrap}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the shard file names and document settings must be the same."""
        if state.get("format") != "PackedDocumentLoader/1":
            raise ValueError(f"not a PackedDocumentLoader state (format {state.get('format')!r}).")
        names = [os.path.basename(p) for p in self.paths]
        if names != list(state["shards"]) or state["max_doc_tokens"] != self.max_doc_tokens \
                or state["bos_id"] != self.bos_id:
            raise ValueError(f"the shards matching {self.pattern!r} or the document settings differ from the saved "
                             "run; an exact resume needs the same files, --max-doc-tokens and --bos-id.")
        self.shard_index, self.doc_index = int(state["shard_index"]), int(state["doc_index"])
        self.epoch, self._warned_wrap = int(state["epoch"]), bool(state["warned_wrap"])
        self._open_shard()


# ----------------------------------------------------------------------------------------------
# Validation and baselines


def iter_val_batches(pattern: str, batch_size: int, seq_len: int, val_tokens: int, rank: int = 0,
                     world_size: int = 1, device: str | torch.device = "cpu"
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield this rank's (inputs, targets) validation batches, int64 (batch_size, seq_len).

    The first val_tokens + 1 tokens of the val files (concatenated in sorted order) are cut into
    contiguous chunks of batch_size * seq_len targets; chunk c goes to rank c % world_size, so over all
    ranks each of those tokens is an input once and a target once. No BOS alignment.
    """
    batch_size = _check_positive_int("batch_size", batch_size)
    seq_len = _check_positive_int("seq_len", seq_len)
    val_tokens = _check_positive_int("val_tokens", val_tokens)
    rank, world_size = _check_rank(rank, world_size)
    chunk_tokens = batch_size * seq_len
    round_tokens = world_size * chunk_tokens
    if val_tokens % round_tokens:
        nearest = max(round_tokens, round(val_tokens / round_tokens) * round_tokens)
        raise ValueError(
            f"val_tokens={val_tokens} must be a multiple of world_size * batch_size * seq_len = "
            f"{world_size} * {batch_size} * {seq_len} = {round_tokens}; the nearest valid value is {nearest}.")
    paths = list_shards(pattern)
    counts = [read_header(p) for p in paths]
    if sum(counts) < val_tokens + 1:
        largest = (sum(counts) - 1) // round_tokens * round_tokens
        raise ValueError(
            f"the val files matching {pattern!r} hold {sum(counts)} tokens, but val_tokens={val_tokens} needs "
            f"{val_tokens + 1} (one extra token for the last target); the largest valid val_tokens "
            f"here is {largest}.")
    dev = _as_device(device)
    for chunk in range(rank, val_tokens // chunk_tokens, world_size):
        span = _read_span(paths, counts, chunk * chunk_tokens, chunk_tokens + 1)
        # Rows overlap by one token: row b is span[b*T : b*T + T + 1].
        rows = np.lib.stride_tricks.sliding_window_view(span, seq_len + 1)[::seq_len]
        yield _to_device(rows, dev)


def _token_counts(paths: list[str], vocab_size: int, block: int = 1 << 24) -> np.ndarray:
    """Histogram (vocab_size,) int64 of the tokens in the shards, read in blocks to bound memory."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for path in paths:
        tokens = read_shard(path)
        for lo in range(0, len(tokens), block):
            part = np.asarray(tokens[lo:lo + block])
            if part.size and int(part.max()) >= vocab_size:
                raise ValueError(f"{path} holds token id {int(part.max())} >= vocab_size={vocab_size}; "
                                 "pass the tokenizer's vocabulary size.")
            counts += np.bincount(part, minlength=vocab_size)
    return counts


def _unigram_log_probs(train_pattern: str, vocab_size: int) -> np.ndarray:
    """log p(t) (vocab_size,) of the add-one unigram model of the train tokens: (count(t) + 1) / (N + vocab_size)."""
    train_counts = _token_counts(list_shards(train_pattern), vocab_size)
    return np.log(train_counts + 1.0) - np.log(float(train_counts.sum() + vocab_size))


def _scored_val_span(val_pattern: str, val_tokens: int, vocab_size: int) -> np.ndarray:
    """Tokens 0 .. val_tokens of the val files (val_tokens + 1 tokens: token i is the target of position i - 1),
    the span the validation loss scores."""
    val_tokens = _check_positive_int("val_tokens", val_tokens)
    val_paths = list_shards(val_pattern)
    val_sizes = [read_header(p) for p in val_paths]
    if sum(val_sizes) < val_tokens + 1:
        raise ValueError(f"the val files matching {val_pattern!r} hold {sum(val_sizes)} tokens, "
                         f"fewer than val_tokens + 1 = {val_tokens + 1}.")
    span = _read_span(val_paths, val_sizes, 0, val_tokens + 1).astype(np.int64)
    if int(span.max()) >= vocab_size:
        raise ValueError(f"val token id {int(span.max())} >= vocab_size={vocab_size}; pass the tokenizer's "
                         "vocabulary size.")
    return span


def unigram_cross_entropy(train_pattern: str, val_pattern: str, vocab_size: int = GPT2_VOCAB_SIZE,
                          val_tokens: int | None = None) -> float:
    """Cross-entropy (nats per token) on val tokens of a unigram model fitted on the train tokens
    with add-one smoothing: p(t) = (count(t) + 1) / (N + vocab_size).

    val_tokens=None scores every token of the val files; an integer scores the targets that the
    validation loss sees (tokens 1 .. val_tokens of the val files), for a like-for-like baseline.
    """
    vocab_size = _check_positive_int("vocab_size", vocab_size)
    log_p = _unigram_log_probs(train_pattern, vocab_size)
    if val_tokens is None:
        val_counts = _token_counts(list_shards(val_pattern), vocab_size)
    else:
        val_counts = np.bincount(_scored_val_span(val_pattern, val_tokens, vocab_size)[1:], minlength=vocab_size)
    if val_counts.sum() == 0:
        raise ValueError(f"the val files matching {val_pattern!r} hold no tokens.")
    return float(-(val_counts * log_p).sum() / val_counts.sum())


def _bigram_counts(paths: list[str], vocab_size: int, block: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """(keys, counts): the distinct pairs of consecutive tokens of the concatenated shards as sorted keys
    prev * vocab_size + next (int64) and how often each occurs. Memory grows with the number of distinct pairs."""
    keys, counts, prev = [], [], None
    for path in paths:
        tokens = read_shard(path)
        for lo in range(0, len(tokens), block):
            part = np.asarray(tokens[lo:lo + block]).astype(np.int64)
            if part.size and int(part.max()) >= vocab_size:
                raise ValueError(f"{path} holds token id {int(part.max())} >= vocab_size={vocab_size}; "
                                 "pass the tokenizer's vocabulary size.")
            seq = part if prev is None else np.concatenate([[prev], part])
            if seq.size >= 2:
                k, c = np.unique(seq[:-1] * vocab_size + seq[1:], return_counts=True)
                keys.append(k)
                counts.append(c)
            if part.size:
                prev = int(part[-1])
    if not keys:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    merged, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    return merged, np.bincount(inverse, weights=np.concatenate(counts)).astype(np.int64)


def bigram_cross_entropy(train_pattern: str, val_pattern: str, vocab_size: int = GPT2_VOCAB_SIZE,
                         val_tokens: int | None = None) -> float:
    """Cross-entropy (nats per token) on val tokens of a bigram model of the train tokens: interpolated
    Witten-Bell smoothing that backs off to the add-one unigram p1 of unigram_cross_entropy,

        p(b | a) = (c(a, b) + T(a) p1(b)) / (c(a) + T(a)),

    with c(a, b) the count of the pair (a, b) in the train stream (shards concatenated in order),
    c(a) = sum_b c(a, b) and T(a) the number of distinct tokens seen after a; p(b | a) = p1(b) for an a
    never seen before another token. No parameter is fitted on the val tokens.

    val_tokens=None scores tokens 1 .. n-1 of the val files (every token that has one before it); an
    integer scores tokens 1 .. val_tokens, the targets the validation loss sees.
    """
    vocab_size = _check_positive_int("vocab_size", vocab_size)
    log_p1 = _unigram_log_probs(train_pattern, vocab_size)
    keys, pair_counts = _bigram_counts(list_shards(train_pattern), vocab_size)
    prev_of_key = keys // vocab_size
    c_prev = np.bincount(prev_of_key, weights=pair_counts, minlength=vocab_size)  # c(a)
    t_prev = np.bincount(prev_of_key, minlength=vocab_size).astype(np.float64)  # T(a)
    if val_tokens is None:
        span = np.concatenate([np.asarray(read_shard(p)) for p in list_shards(val_pattern)]).astype(np.int64)
        if span.size and int(span.max()) >= vocab_size:
            raise ValueError(f"val token id {int(span.max())} >= vocab_size={vocab_size}.")
    else:
        span = _scored_val_span(val_pattern, val_tokens, vocab_size)
    if span.size < 2:
        raise ValueError(f"the val files matching {val_pattern!r} hold fewer than 2 tokens.")
    a, b = span[:-1], span[1:]
    query = a * vocab_size + b
    c_ab = np.zeros(query.shape, dtype=np.int64)  # c(a, b) of each scored pair
    if keys.size:
        at = np.minimum(np.searchsorted(keys, query), keys.size - 1)
        c_ab = np.where(keys[at] == query, pair_counts[at], 0)
    p1 = np.exp(log_p1[b])
    denominator = c_prev[a] + t_prev[a]
    seen = denominator > 0
    p = np.where(seen, (c_ab + t_prev[a] * p1) / np.where(seen, denominator, 1.0), p1)
    return float(-np.log(p).mean())
