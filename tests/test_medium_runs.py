"""medium-tiny end to end: every record-18 feature and schedule transition in a short CPU run.

The runs use a 512-token vocabulary on synthetic documents (the recipe does not depend on the vocabulary; the
GPT-2-sized tables would make each step seconds) and 20 steps (19 scheduled + 1 extension), which still cross
every batch, window, MTP and untie transition (checked below)."""
import math

import numpy as np
import pytest
import torch

import schedules
import train_gpt
from config import parse_config
from test_train_gpt import read_losses, run_train_gpt

STEPS = 20
ARGS = ["--preset", "medium-tiny", "--vocab-size", "512", "--bos-id", "511", "--num-iterations", str(STEPS),
        "--extension-steps", "1", "--val-loss-every", "10", "--val-tokens", "2048", "--print-every", "5"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Documents (start token 511, ~40 tokens long) in which each token is a fixed function of the previous one
    90% of the time (something to learn), in the shard format."""
    from data.shards import write_shard

    out = tmp_path_factory.mktemp("medium_shards")
    rng = np.random.default_rng(0)
    successor = rng.permutation(500)
    for name, n in (("mt_val_000000.bin", 8192), ("mt_train_000001.bin", 40000)):
        tokens = np.empty(n, dtype=np.uint16)
        tokens[0] = 511
        for t in range(1, n):
            if rng.random() < 0.025:
                tokens[t] = 511
            elif tokens[t - 1] != 511 and rng.random() < 0.9:
                tokens[t] = successor[tokens[t - 1]]
            else:
                tokens[t] = rng.integers(0, 500)
        write_shard(str(out / name), tokens)
    return ["--train-files", str(out / "mt_train_*.bin"), "--val-files", str(out / "mt_val_*.bin")]


def config(shards, tmp_path, *extra):
    return parse_config(ARGS + shards + ["--log-dir", str(tmp_path / "logs"),
                                         "--checkpoint-dir", str(tmp_path / "ckpt"), *extra])


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    """One in-process run of all 20 steps: exact float losses."""
    tmp = tmp_path_factory.mktemp("medium_full")
    return train_gpt.train(config(shards, tmp, "--run-id", "full"))


def test_the_short_run_crosses_every_transition():
    cfg = parse_config(ARGS)
    steps = [schedules.schedule_at(cfg, s) for s in range(STEPS)]
    assert sorted({s.tokens for s in steps}) == [256, 512, 768, 1024]
    assert {len(s.mtp_weights) for s in steps} == {1, 2, 3}
    assert {s.long_window // 16 for s in steps} == {3, 7, 11, 13, 15, 17, 19, 21, 23}
    assert schedules.untie_step(cfg) == 5 and steps[5].tied and not steps[6].tied
    assert len({s.yarn_changes for s in steps}) == 4  # YaRN at 3->7, 7->11, 11->13 blocks


@pytest.mark.slow
def test_medium_tiny_learns_and_logs_every_step(uninterrupted):
    train, val = uninterrupted["train_losses"], uninterrupted["val_losses"]
    assert sorted(train) == list(range(1, STEPS + 1)) and sorted(val) == [0, 10, 20]
    assert all(math.isfinite(x) for x in train.values())
    assert val[0] > math.log(500) - 0.1 and val[20] < val[0] - 0.1  # uniform-ish start over ~500 tokens


@pytest.mark.slow
def test_two_processes_reproduce_one_process(uninterrupted, shards, tmp_path):
    """Same global batch: 1 process x 2 forwards vs 2 gloo processes x 1 forward, through every transition."""
    run_train_gpt(ARGS + shards + ["--log-dir", str(tmp_path), "--run-id", "two"], nproc=2, timeout=900)
    val2, train2 = read_losses(tmp_path / "two.txt")
    assert sorted(train2) == sorted(uninterrupted["train_losses"]) and sorted(val2) == [0, 10, 20]
    for step, loss in uninterrupted["train_losses"].items():
        assert math.isclose(train2[step], loss, rel_tol=0, abs_tol=2e-4), (step, train2[step], loss)
    for step, loss in uninterrupted["val_losses"].items():
        assert math.isclose(val2[step], loss, rel_tol=0, abs_tol=2e-4), (step, val2[step], loss)


@pytest.mark.slow
def test_killed_after_untie_and_resumed_before_it_is_bit_identical(uninterrupted, shards, tmp_path):
    """Checkpoints at steps 3 and 6, crash at step 8 (split since step 6), resume from step 3 (tied, and between
    the two calls of an odd-step Adam step: step 2's gradient waits in the checkpoint): the same floats."""
    killed = config(shards, tmp_path, "--run-id", "killed", "--checkpoint-every", "3", "--debug-crash-at-step", "8")
    with pytest.raises(RuntimeError, match="debug crash"):
        train_gpt.train(killed)
    checkpoint = tmp_path / "ckpt" / "killed" / "step_000003"
    assert (checkpoint / "meta.json").exists() and (tmp_path / "ckpt" / "killed" / "step_000006").exists()
    resumed = train_gpt.train(config(shards, tmp_path, "--resume", str(checkpoint)))
    assert sorted(resumed["train_losses"]) == list(range(4, STEPS + 1))
    for step, loss in resumed["train_losses"].items():
        assert loss == uninterrupted["train_losses"][step], step
    assert resumed["val_losses"][10] == uninterrupted["val_losses"][10]
    assert resumed["val_losses"][20] == uninterrupted["val_losses"][20]
    log = (tmp_path / "logs" / "killed.txt").read_text()
    assert "resumed from" in log and "step:20/20 val_loss" in log


@pytest.mark.slow
def test_checkpoint_after_the_split_holds_the_embedding_and_its_adam_state(shards, tmp_path):
    cfg = config(shards, tmp_path, "--run-id", "split", "--num-iterations", "8", "--checkpoint-every", "7",
                 "--val-loss-every", "0")
    assert schedules.untie_step(cfg) == 3
    train_gpt.train(cfg)
    checkpoint = tmp_path / "ckpt" / "split" / "step_000007"
    model = train_gpt.GPT(cfg)
    model.load_state_dict(torch.load(checkpoint / "model.pt"))
    assert not torch.equal(model.embed.weight, model.head.weight)  # split at step 3, then trained apart
    adam = train_gpt.build_optimizers(model, cfg)[0]
    adam.load_state_dict(torch.load(checkpoint / "rank0.pt", weights_only=False)["optimizers"][0])
    embed, head = adam.state[model.embed.weight], adam.state[model.head.weight]
    # Adam stepped on steps 1, 3 (then the split) and 5; step 6's gradient waits in the state for step 7
    assert embed["step"] == head["step"] == 3 and not torch.equal(embed["exp_avg"], head["exp_avg"])
    assert "held_grad" in embed and "held_grad" in head


@pytest.mark.slow
def test_warm_up_reductions_in_step_and_frequent_flushes_change_nothing(uninterrupted, shards, tmp_path):
    """The untimed compile warm-up over every transition (state restored after), every reduction started in its
    optimizer's step() and the step lines flushed every 3 steps: the same floats as the uninterrupted run (no
    warm-up, overlapped reductions, one flush at each validation); the log lists the warm-up's schedule steps."""
    cfg = config(shards, tmp_path, "--run-id", "variant", "--warmup-steps", "1", "--no-overlap-comm",
                 "--log-flush-every", "3")
    result = train_gpt.train(cfg)
    assert result["train_losses"] == uninterrupted["train_losses"]
    assert result["val_losses"] == uninterrupted["val_losses"]
    log_path = tmp_path / "logs" / "variant.txt"
    warmed = [int(line.split("schedule step ")[1].split(")")[0]) for line in log_path.read_text().splitlines()
              if line.startswith("warm-up step ")]
    assert warmed == schedules.warmup_plan(cfg) and set(schedules.transition_steps(cfg)) <= set(warmed)
    _, logged = read_losses(log_path)
    assert logged == {step: float(f"{loss:.4f}") for step, loss in result["train_losses"].items()}
