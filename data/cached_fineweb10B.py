"""Download the GPT-2-tokenized FineWeb shards (Hugging Face dataset kjj0/fineweb10B-gpt2).

  python data/cached_fineweb10B.py N [--local-dir data/fineweb10B]

fetches fineweb_val_000000.bin (the validation shard) and the first N training shards
fineweb_train_000001.bin ... (100M tokens, ~200 MB each; the dataset has 103). The GPT-2 Medium
speedrun track trains on ~2.2B tokens and needs N >= 22 (use a few more for margin); N = 1 is enough
to try the code. Files already present with a valid header are skipped; invalid ones are fetched again.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.shards import ShardFormatError, read_header

REPO_ID = "kjj0/fineweb10B-gpt2"
MAX_TRAIN_SHARDS = 103
DEFAULT_LOCAL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fineweb10B")
MEDIUM_TRACK_TRAIN_SHARDS = 22


def shard_names(num_train_shards: int) -> list[str]:
    """The val shard followed by the first num_train_shards train shards."""
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, num_train_shards + 1)]


def _valid_token_count(path: str) -> int | None:
    """Token count of a valid shard at path, or None (missing or invalid, with the reason printed)."""
    if not os.path.exists(path):
        return None
    try:
        return read_header(path)
    except ShardFormatError as exc:
        print(f"  {os.path.basename(path)} is present but invalid ({exc}); downloading it again", flush=True)
        return None


def download_fineweb(num_train_shards: int, local_dir: str = DEFAULT_LOCAL_DIR, repo_id: str = REPO_ID) -> list[str]:
    """Make sure the val shard and num_train_shards train shards are in local_dir; return their paths."""
    if isinstance(num_train_shards, bool) or not isinstance(num_train_shards, int) \
            or not 0 <= num_train_shards <= MAX_TRAIN_SHARDS:
        raise ValueError(f"the number of train shards must be an integer in [0, {MAX_TRAIN_SHARDS}], "
                         f"got {num_train_shards!r}.")
    names = shard_names(num_train_shards)
    os.makedirs(local_dir, exist_ok=True)
    paths, missing = [], []
    for name in names:
        path = os.path.join(local_dir, name)
        paths.append(path)
        count = _valid_token_count(path)
        if count is None:
            missing.append(name)
        else:
            print(f"  {name}: already present ({count:,} tokens), skipping", flush=True)
    if not missing:
        print(f"all {len(names)} shards present in {local_dir}", flush=True)
        return paths
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise RuntimeError("huggingface_hub is not installed; `pip install huggingface_hub` and run again.") from exc
    t0 = time.time()
    for i, name in enumerate(missing, 1):
        target = os.path.join(local_dir, name)
        print(f"[{i}/{len(missing)}] downloading {name} from {repo_id} ...", flush=True)
        try:
            got = hf_hub_download(repo_id=repo_id, filename=name, repo_type="dataset", local_dir=local_dir,
                                  force_download=os.path.exists(target))
        except Exception as exc:  # network, authentication, missing file: name the file and stop
            raise RuntimeError(
                f"downloading {name} from the Hugging Face dataset {repo_id} failed: {type(exc).__name__}: {exc}. "
                "Check the network connection (or HF_ENDPOINT / HF_TOKEN) and run the command again; "
                "shards already downloaded are kept.") from exc
        if os.path.abspath(got) != os.path.abspath(target):  # older hub versions return a cache path
            shutil.copyfile(got, target)
        try:
            count = read_header(target)
        except ShardFormatError as exc:
            raise RuntimeError(f"the downloaded {name} is not a valid shard: {exc}") from exc
        print(f"[{i}/{len(missing)}] {name}: {count:,} tokens, {time.time() - t0:.0f}s elapsed", flush=True)
    print(f"done: {len(names)} shards in {local_dir}", flush=True)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("num_train_shards", type=int, metavar="N",
                        help=f"number of 100M-token train shards (0-{MAX_TRAIN_SHARDS}); the GPT-2 Medium track "
                             f"needs ~{MEDIUM_TRACK_TRAIN_SHARDS}+")
    parser.add_argument("--local-dir", default=DEFAULT_LOCAL_DIR, help="destination folder (default data/fineweb10B)")
    args = parser.parse_args(argv)
    try:
        download_fineweb(args.num_train_shards, args.local_dir)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
