"""Step time of `medium` at each batch stage on one GPU, beside record 18's 8-GPU step times; `medium-r8` at full
batch; the matrix-optimizer step alone. Prints a table and writes timing.json.

    python bench/gpu_timing.py --out DIR                  # one GPU, the record's sizes (bench/gpu_medium.sh timing)
    python bench/gpu_timing.py --out DIR --size cpu       # the same script on the CPU at medium-tiny sizes

For each of `medium`'s batch stages (131,072 / 262,144 / 393,216 / 524,288 tokens per step) the training step of
train_gpt.py (`make_train_step`: accumulation over the record's 8 forwards per step, Adam's reductions inside
backward, the matrix optimizer's launched before Adam's update, no host sync) runs at the middle step of the stage
(its window, MTP weights and tie state): `--warmup` untimed steps first (they compile that step's graph), then
`--steps` timed steps between two device syncs. Reported per stage: ms per step, tokens/s, peak memory, and the
graphs torch.compile built during the timed steps (0 when the warm-up did its job).

Beside each stage: the record's 8-GPU step time (records/.../2025-12-31_BulkSmallTrackTransfer logs, quoted in
../shared/design/speedrun_recipe.md) and our 1-GPU time / 8, an ESTIMATE of our 8-GPU step that leaves out all
communication (and assumes the 8 forwards of a step split perfectly over 8 GPUs). The estimated wall-clock to 2.92
for `medium` on 8 GPUs is the sum over stages of (the schedule's steps in that stage) x (that estimate), also an
estimate: it takes each stage's time at the stage's middle step, so the window growth inside the 524K stage is
represented by its middle window only. The same sum over the record's own stage times gives 1,039 s against the
record's measured 1,041 s, which bounds what the stage-middle approximation loses.

The data is local text (data/demo/, `python data/prepare_demo_data.py`); documents are cut at 65,536 tokens as in
the smoke check, since the demo corpus is whole books.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from bench.gpu_medium_report import device_and_versions  # noqa: E402

# Record 18's 8x H100 step time per batch stage, ms (its logs, as quoted in the design note; 524K: 247-250 ms)
RECORD_18_STAGE_MS = {131_072: 72.1, 262_144: 129.2, 393_216: 189.4, 524_288: 248.5}
RECORD_18_WALL_CLOCK_S = 1041.07  # the faster of the two record logs
RECORD_8_STEP_MS = 246.5  # record 8 (what medium-r8 reproduces): 1468.9 s over 5960 steps at 524,288 tokens/step
DEMO = ["--train-files", "data/demo/demo_train_*.bin", "--val-files", "data/demo/demo_val_*.bin",
        "--max-doc-tokens", "65536"]
# --size cpu: the medium-tiny sizes (d=64, 16 layers, 16-token window blocks), no compile
CPU_ARGS = ["--device", "cpu", "--no-compile", "--model-dim", "64", "--num-heads", "2", "--head-dim", "32",
            "--window-block", "16", "--batch-tokens", "1024", "--micro-batch-tokens", "512",
            "--batch-schedule", "256,512,768" + ",1024" * 9, "--val-tokens", "4096", "--val-seq-len", "1024"]
CPU_R8_ARGS = ["--device", "cpu", "--no-compile", "--model-dim", "64", "--num-heads", "2", "--head-dim", "32",
               "--window-block", "16", "--max-window-tokens", "256", "--batch-tokens", "1024",
               "--micro-batch-tokens", "512", "--seq-len", "512", "--val-tokens", "4096", "--val-seq-len", "1024"]


def stage_steps(cfg) -> dict[int, list[int]]:
    """{tokens per step: the training steps that run at that batch size}, in order of first appearance."""
    from schedules import tokens_at

    stages: dict[int, list[int]] = {}
    for step in range(cfg.num_iterations):
        stages.setdefault(tokens_at(cfg, step), []).append(step)
    return stages


def wall_clock_estimate(steps_per_stage: dict[int, int], stage_ms: dict[int, float]) -> float:
    """Seconds: sum over stages of steps x ms per step."""
    return sum(n * stage_ms[tokens] for tokens, n in steps_per_stage.items()) / 1000


def graphs_compiled() -> int:
    """Graphs torch.compile has built in this process so far (torch._dynamo's counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(cfg, device: torch.device):
    """The model as train_gpt.train builds it (seeded; bf16 storage when the config asks)."""
    import train_gpt

    torch.manual_seed(cfg.seed)
    model = train_gpt.GPT(cfg).to(device)
    if cfg.bf16_storage:
        train_gpt.apply_bf16_storage(model)
    return model


class Trainer:
    """train_gpt.py's model, optimizers, loader and training step for one config, at world size 1."""

    def __init__(self, cfg):
        import train_gpt

        self.cfg = cfg
        self.rank, self.world_size, self.device = train_gpt.setup_distributed(cfg)
        self.accum_steps = train_gpt.validate_config(cfg, self.world_size)
        self.model = build_model(cfg, self.device)
        self.optimizers = train_gpt.build_optimizers(self.model, cfg)
        self.loader = train_gpt.make_train_loader(cfg, self.rank, self.world_size, self.device)
        self.next_batch = train_gpt.batch_source(cfg, self.loader)
        self.train_step = train_gpt.make_train_step(cfg, self.model, train_gpt.compile_model(cfg, self.model),
                                                    self.optimizers, self.device, self.accum_steps)

    def time_steps(self, step: int, warmup: int, steps: int) -> dict:
        """`warmup` untimed then `steps` timed training steps, all at schedule step `step`."""
        for _ in range(warmup):
            self.train_step(step, self.next_batch)
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        graphs, t0 = graphs_compiled(), time.perf_counter()
        losses = [self.train_step(step, self.next_batch) for _ in range(steps)]
        last_loss = float(losses[-1])  # the one device sync of the timed steps
        elapsed = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
        return dict(step_ms=1000 * elapsed / steps, graphs_compiled_while_timed=graphs_compiled() - graphs,
                    peak_memory_mib=None if peak is None else round(peak), last_loss=last_loss)


def profile_steps(trainer: Trainer, step: int, path: str, steps: int = 2) -> None:
    """torch.profiler over `steps` training steps at schedule step `step`: the top operators by device time (CPU
    time without a GPU) written to `path`."""
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.train_step(step, trainer.next_batch)
        sync(trainer.device)
    table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=30)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"{steps} training steps at schedule step {step}\n{table}\n")


def time_matrix_optimizer(cfg, steps: int, warmup: int) -> dict:
    """The matrix optimizer's step() alone on the model's hidden matrices with random gradients (world size 1)."""
    import train_gpt

    device = train_gpt.setup_distributed(cfg)[2]
    matrix = train_gpt.build_optimizers(build_model(cfg, device), cfg)[1]
    params = [p for group in matrix.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(warmup):
        matrix.step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        matrix.step()
    sync(device)
    ms = 1000 * (time.perf_counter() - t0) / steps
    return dict(optimizer=cfg.optimizer, step_ms=ms, matrices=len(params),
                parameters=sum(p.numel() for p in params),
                estimate_8gpu_ms=ms / 8, estimate_note="1-GPU time / 8: each of 8 ranks orthogonalises 1/8 of the "
                "matrices; leaves out the reduce-scatter and all-gather")


def run(args) -> dict:
    from config import parse_config
    from schedules import scheduled_steps

    cpu = args.size == "cpu"
    medium = parse_config(["--preset", "medium", *DEMO, *(CPU_ARGS if cpu else [])])
    stages = stage_steps(medium)
    trainer = Trainer(medium)
    rows = []
    for tokens, steps in stages.items():
        if args.stages and len(rows) >= args.stages:
            break
        scheduled = [s for s in steps if s < scheduled_steps(medium)] or steps
        step = scheduled[len(scheduled) // 2]  # the stage's middle step
        result = trainer.time_steps(step, args.warmup, args.steps)
        full_tokens = tokens if not cpu else None
        record_ms = RECORD_18_STAGE_MS.get(full_tokens) if full_tokens else None
        rows.append(dict(preset="medium", tokens_per_step=tokens, at_step=step, steps_in_stage=len(steps),
                         tokens_per_s=tokens / (result["step_ms"] / 1000), **result,
                         estimate_8gpu_ms=result["step_ms"] / 8, record_18_8gpu_ms=record_ms,
                         ratio_to_record=None if record_ms is None else result["step_ms"] / 8 / record_ms))
    if args.profile:
        profile_steps(trainer, rows[-1]["at_step"], os.path.join(args.out, "profile.txt"))
    del trainer
    if torch.cuda.is_available() and not cpu:
        torch.cuda.empty_cache()

    r8 = parse_config(["--preset", "medium-r8", *DEMO[:4], *(CPU_R8_ARGS if cpu else [])])
    trainer = Trainer(r8)
    step = r8.num_iterations // 2
    result = trainer.time_steps(step, args.warmup, args.steps)
    rows.append(dict(preset="medium-r8", tokens_per_step=r8.batch_tokens, at_step=step,
                     steps_in_stage=r8.num_iterations,
                     tokens_per_s=r8.batch_tokens / (result["step_ms"] / 1000), **result,
                     estimate_8gpu_ms=result["step_ms"] / 8, record_8_8gpu_ms=None if cpu else RECORD_8_STEP_MS))
    del trainer

    optimizer_rows = [time_matrix_optimizer(parse_config(["--preset", "medium", *DEMO, *(CPU_ARGS if cpu else []),
                                                          "--optimizer", name]), args.steps, args.warmup)
                      for name in ("muon", "normuon")]

    medium_rows = [r for r in rows if r["preset"] == "medium"]
    covered = len(medium_rows) == len(stages)
    estimate = wall_clock_estimate({r["tokens_per_step"]: r["steps_in_stage"] for r in medium_rows},
                                   {r["tokens_per_step"]: r["estimate_8gpu_ms"] for r in medium_rows})
    return dict(
        check="medium per-stage step time on one device",
        size=args.size, timed_steps=args.steps, warmup_steps=args.warmup, **device_and_versions(),
        stages=rows, matrix_optimizer_step=optimizer_rows,
        wall_clock_estimate_8gpu_s=estimate if covered else None,
        wall_clock_estimate_note=("ESTIMATE of medium's training time to its last step on 8 GPUs: sum over batch "
                                  "stages of steps x (1-GPU step time / 8), without communication, each stage "
                                  "timed at its middle step"),
        record_18_wall_clock_s=None if cpu else RECORD_18_WALL_CLOCK_S,
        record_18_stage_sum_s=None if cpu else wall_clock_estimate(
            {r["tokens_per_step"]: r["steps_in_stage"] for r in medium_rows}, RECORD_18_STAGE_MS),
    )


def format_report(report: dict) -> str:
    from runlog import format_table

    def ms(value):
        return "-" if value is None else f"{value:.1f}"

    header = ["preset", "tokens/step", "at step", "ms/step (1 dev)", "tokens/s", "peak MiB", "new graphs",
              "est. 8-GPU ms", "record 8-GPU ms"]
    rows = [[r["preset"], f"{r['tokens_per_step']:,}", str(r["at_step"]), ms(r["step_ms"]),
             f"{r['tokens_per_s']:,.0f}", "-" if r["peak_memory_mib"] is None else str(r["peak_memory_mib"]),
             str(r["graphs_compiled_while_timed"]), ms(r["estimate_8gpu_ms"]),
             ms(r.get("record_18_8gpu_ms", r.get("record_8_8gpu_ms")))] for r in report["stages"]]
    lines = [f"{report['device']}, torch {report['torch']}, triton {report['triton']}; {report['timed_steps']} "
             f"timed steps after {report['warmup_steps']} untimed per row", format_table(header, rows), ""]
    lines += [f"matrix optimizer step alone, {o['optimizer']}: {o['step_ms']:.2f} ms on one device "
              f"({o['matrices']} matrices), est. {o['estimate_8gpu_ms']:.2f} ms per GPU on 8"
              for o in report["matrix_optimizer_step"]]
    if report["wall_clock_estimate_8gpu_s"] is not None:
        lines.append(f"estimated 8-GPU training time of medium (no communication): "
                     f"{report['wall_clock_estimate_8gpu_s']:.0f} s")
    if report["record_18_wall_clock_s"]:
        lines.append(f"record 18: {report['record_18_wall_clock_s']:.0f} s measured, "
                     f"{report['record_18_stage_sum_s']:.0f} s from its stage times by the same sum")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for timing.json")
    parser.add_argument("--size", choices=("full", "cpu"), default=os.environ.get("GPU_TIMING_SIZE", "full"),
                        help="full: the presets as they are (one GPU); cpu: medium-tiny sizes on the CPU "
                             "(default from GPU_TIMING_SIZE, else full)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each row (default 2)")
    parser.add_argument("--stages", type=int, default=0, help="time only the first N batch stages (0: all)")
    parser.add_argument("--profile", action="store_true",
                        help="also write profile.txt: torch.profiler's top operators over 2 steps of the last stage")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.stages < 0:
        parser.error("--steps and --warmup must be >= 1 (the warm-up compiles the row's graph), --stages >= 0")
    if args.size == "full" and not torch.cuda.is_available():
        print("error: --size full needs a CUDA device; rehearse on the CPU with --size cpu", file=sys.stderr)
        return 2
    missing = [p for p in ("data/demo/demo_train_000001.bin",) if not os.path.exists(os.path.join(REPO, p))]
    if missing:
        print("error: no demo data in data/demo/; run python data/prepare_demo_data.py first", file=sys.stderr)
        return 2
    os.chdir(REPO)
    report = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "timing.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(format_report(report))
    print(f"wrote {os.path.join(args.out, 'timing.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
