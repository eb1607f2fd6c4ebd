"""PackedDocumentLoader (record 18's BOS-aligned packing with a per-document cap) against a plain-list reference."""
import numpy as np
import pytest
import torch

from data.shards import PackedDocumentLoader, write_shard

BOS = 50256


def make_shards(tmp_path, lengths_per_shard, seed=0):
    """Shards of documents with the given lengths (each starts with BOS); returns (pattern, [[doc tokens]])."""
    rng = np.random.default_rng(seed)
    docs_per_shard = []
    for s, lengths in enumerate(lengths_per_shard):
        docs = [np.concatenate([[BOS], rng.integers(0, 50000, n - 1)]).astype(np.uint16) for n in lengths]
        junk = rng.integers(0, 50000, 3).astype(np.uint16)  # tokens before the first BOS are never used
        write_shard(tmp_path / f"pk_train_{s:06d}.bin", np.concatenate([junk, *docs]))
        docs_per_shard.append([d.tolist() for d in docs])
    return str(tmp_path / "pk_train_*.bin"), docs_per_shard


def reference_batches(docs_per_shard, calls, world_size, max_doc):
    """Per call, each rank's token run of tokens + 1: consecutive documents cut to max_doc, the last one cut to fit;
    a call that does not fit in the rest of the shard starts over at the next shard's first document."""
    shard, doc, out = 0, 0, []
    for tokens in calls:
        while True:
            runs, d = [], doc
            docs = docs_per_shard[shard]
            for _ in range(world_size):
                run = []
                while len(run) < tokens + 1 and d < len(docs):
                    run += docs[d][:max_doc][:tokens + 1 - len(run)]
                    d += 1
                runs.append(run)
            if all(len(r) == tokens + 1 for r in runs):
                break
            shard, doc = (shard + 1) % len(docs_per_shard), 0
        doc = d
        out.append(runs)
    return out


@pytest.mark.filterwarnings("ignore:PackedDocumentLoader")  # the calls pass the end of the data on purpose
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_packing_matches_reference_for_every_rank(tmp_path, world_size):
    lengths = [[7, 30, 5, 12, 40, 3, 9, 22, 6, 18, 11, 4, 25], [15, 8, 33, 2, 10, 27, 14, 9, 5, 19, 21, 7]]
    pattern, docs = make_shards(tmp_path, lengths)
    calls = [10, 10, 24, 16, 10, 30, 12, 10, 24]  # tokens per forward changes like the batch schedule
    expected = reference_batches(docs, calls, world_size, max_doc=13)
    for rank in range(world_size):
        loader = PackedDocumentLoader(pattern, rank=rank, world_size=world_size, max_doc_tokens=13, bos_id=BOS)
        for call, tokens in enumerate(calls):
            inputs, targets = loader.next_batch(tokens)
            run = expected[call][rank]
            assert inputs.shape == targets.shape == (1, tokens)
            assert inputs[0].tolist() == run[:-1] and targets[0].tolist() == run[1:], (rank, call)
            assert inputs[0, 0].item() == BOS


def test_one_process_two_calls_equal_two_processes_one_call(tmp_path):
    pattern, _ = make_shards(tmp_path, [[9, 14, 6, 20, 11, 7, 30, 5, 12, 8] * 3])
    single = PackedDocumentLoader(pattern, max_doc_tokens=16, bos_id=BOS)
    pair = [PackedDocumentLoader(pattern, rank=r, world_size=2, max_doc_tokens=16, bos_id=BOS) for r in range(2)]
    for tokens in (12, 12, 20, 8):
        a, b = single.next_batch(tokens), single.next_batch(tokens)
        for mine, theirs in zip((a, b), (pair[0].next_batch(tokens), pair[1].next_batch(tokens))):
            assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])


def test_documents_are_capped_and_rows_start_at_bos(tmp_path):
    pattern, _ = make_shards(tmp_path, [[100, 3, 100, 50, 7, 100, 2, 60] * 4])
    loader = PackedDocumentLoader(pattern, max_doc_tokens=32, bos_id=BOS)
    for _ in range(6):
        inputs, targets = loader.next_batch(64)
        row = torch.cat([inputs[0], targets[0, -1:]])
        starts = (row == BOS).nonzero().flatten().tolist() + [row.numel()]
        assert starts[0] == 0 and max(b - a for a, b in zip(starts, starts[1:])) <= 32


def test_resume_continues_the_exact_stream_and_wraps(tmp_path):
    pattern, _ = make_shards(tmp_path, [[9, 14, 6, 20, 11], [7, 30, 5, 12, 8, 10]])
    loader = PackedDocumentLoader(pattern, world_size=1, max_doc_tokens=16, bos_id=BOS)
    for _ in range(3):
        loader.next_batch(12)
    saved = loader.state_dict()
    with pytest.warns(RuntimeWarning, match="started again"):
        after = [loader.next_batch(t) for t in (12, 20, 12, 12, 12)]  # passes the end of the last shard
    resumed = PackedDocumentLoader(pattern, world_size=1, max_doc_tokens=16, bos_id=BOS)
    resumed.load_state_dict(saved)
    with pytest.warns(RuntimeWarning):
        again = [resumed.next_batch(t) for t in (12, 20, 12, 12, 12)]
    for x, y in zip(after, again):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    other = PackedDocumentLoader(pattern, max_doc_tokens=8, bos_id=BOS)
    with pytest.raises(ValueError, match="max-doc-tokens"):
        other.load_state_dict(saved)


def test_too_few_documents_is_a_clear_error(tmp_path):
    pattern, _ = make_shards(tmp_path, [[5, 6]])
    with pytest.raises(ValueError, match="fewer tokens per forward or more data"):
        PackedDocumentLoader(pattern, max_doc_tokens=16, bos_id=BOS).next_batch(64)
