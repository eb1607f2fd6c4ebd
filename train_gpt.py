"""GPT-2 Medium speedrun training with pluggable matrix optimizers.

    torchrun --standalone --nproc_per_node=8 train_gpt.py              # medium track, 8x H100
    python train_gpt.py --preset cpu-tiny                              # small, on a CPU

The training loop lives here; the config and presets in config.py, the model in model.py, the step schedules
in schedules.py, optimizers in optimizers/, orthogonalisation kernels in kernels/, the data format and loaders
in data/shards.py.
Nothing runs at import time: main() sets up the process group, so tests can import this file.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
import uuid

import torch
import torch.distributed as dist

REPO_ROOT = os.path.dirname(os.path.realpath(__file__))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from config import (ConfigError, Hyperparameters, parse_config, parse_optimizer_args,  # noqa: E402
                    validate_config)
from model import GPT  # noqa: E402
import track3  # noqa: E402
from schedules import lr_multiplier, momentum_at, validation_due, window_tokens_at  # noqa: E402


# -----------------------------------------------------------------------------------------------
# Optimizers


def build_optimizers(model: GPT, cfg: Hyperparameters, diagnostics_path: str | None = None
                     ) -> list[torch.optim.Optimizer]:
    """Hidden matrices -> the chosen matrix optimizer; embeddings, head and scalars -> DistAdam.
    Every parameter lands in exactly one group (asserted). Optimizers that take `param_names` get the hidden
    matrices' names; those that write diagnostics get `diagnostics_path` unless --optimizer-args sets one."""
    from optimizers import DistAdam, get_optimizer_class

    attn_mats, mlp_mats, scalars = [], [], []
    attn_names, mlp_names = [], []
    for i, block in enumerate(model.blocks):
        for name, p in block.named_parameters():
            if p.ndim < 2:
                scalars.append(p)
            elif name.startswith("mlp."):
                mlp_mats.append(p)
                mlp_names.append(f"blocks.{i}.{name}")
            else:
                attn_mats.append(p)
                attn_names.append(f"blocks.{i}.{name}")
    embeds = [model.embed.weight] + [t.weight for t in model.value_embeds]
    head = [model.head.weight]
    # outside the blocks: skip weights, norm gains, the head's bias
    scalars += [p for name, p in model.named_parameters() if not name.startswith("blocks.") and p.ndim < 2]
    grouped = attn_mats + mlp_mats + scalars + embeds + head
    assert len({id(p) for p in grouped}) == len(grouped) == len(list(model.parameters())), \
        "every parameter must land in exactly one optimizer group"

    betas = (cfg.adam_beta1, cfg.adam_beta2)
    adam = DistAdam([dict(params=embeds, lr=cfg.embed_lr), dict(params=head, lr=cfg.head_lr),
                     dict(params=scalars, lr=cfg.scalar_lr)], lr=cfg.scalar_lr, betas=betas, eps=cfg.adam_eps,
                    weight_decay=cfg.adam_weight_decay)
    matrix_cls = get_optimizer_class(cfg.optimizer)
    kwargs = parse_optimizer_args(cfg.optimizer_args)
    accepted = inspect.signature(matrix_cls.__init__).parameters
    if "param_names" in accepted:
        kwargs.setdefault("param_names", attn_names + mlp_names)
    if "diagnostics_path" in accepted and kwargs.get("diagnostics_every", 0) and diagnostics_path:
        kwargs.setdefault("diagnostics_path", diagnostics_path)
    try:
        matrix = matrix_cls([dict(params=attn_mats, weight_decay_mul=1.0),
                             dict(params=mlp_mats, weight_decay_mul=cfg.mlp_weight_decay_mul)],
                            lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"--optimizer-args {cfg.optimizer_args!r} do not fit {matrix_cls.__name__}: {exc}") from exc
    for opt in (adam, matrix):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return [adam, matrix]


# -----------------------------------------------------------------------------------------------
# Logging and checkpoints


SEPARATOR = "=" * 100


class RunLog:
    """Console progress on rank 0 plus the record-format log file logs/<run_id>.txt."""

    def __init__(self, path: str | None, master: bool):
        self.path, self.master = path, master

    def write(self, line: str, console: bool = True):
        if not self.master:
            return
        if console:
            print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def project_sources() -> list[str]:
    """Relative paths of the project's own source files that this process imported (plus this file)."""
    paths = {os.path.realpath(__file__)}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not (path and os.path.isabs(path) and path.endswith(".py") and os.path.isfile(path)):
            continue  # builtins and frozen or oddly-registered modules
        path = os.path.realpath(path)
        if path.startswith(REPO_ROOT + os.sep) and f"{os.sep}tests{os.sep}" not in path:
            paths.add(path)
    return sorted(os.path.relpath(p, REPO_ROOT) for p in paths)


def environment_lines(device: torch.device) -> list[str]:
    lines = [f"Running Python {sys.version.split()[0]}", f"Running PyTorch {torch.__version__}"]
    try:
        import triton
        lines.append(f"Running Triton {triton.__version__}")
    except ImportError:
        lines.append("Running Triton (not installed)")
    if device.type == "cuda":
        try:
            lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout.rstrip())
        except (OSError, subprocess.SubprocessError):
            lines.append(f"GPU: {torch.cuda.get_device_name(device)}")
    else:
        lines.append(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                     f"torch threads {torch.get_num_threads()}")
    return lines


def write_log_header(log: RunLog, cfg: Hyperparameters, device: torch.device, world_size: int):
    if not (log.master and log.path):
        return
    with open(log.path, "a") as f:
        for rel in project_sources():
            with open(os.path.join(REPO_ROOT, rel)) as src:
                f.write(f"# file: {rel}\n{src.read()}\n")
        f.write(SEPARATOR + "\n")
        f.write("\n".join(environment_lines(device)) + "\n")
        f.write(f"world_size: {world_size}\n")
        f.write("config: " + json.dumps(dataclasses.asdict(cfg)) + "\n")
        f.write(SEPARATOR + "\n")


def save_checkpoint(path: str, model, optimizers, loader, step: int, train_time_ms: float, cfg, rank: int,
                    world_size: int):
    """Writes <path>/ atomically: every rank writes into <path>.tmp, then rank 0 renames it.
    model.pt (rank 0), rank<r>.pt: optimizer shards, loader position and RNG state of that rank."""
    tmp = path + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(tmp, "model.pt"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(dict(step=step, train_time_ms=train_time_ms, world_size=world_size,
                           config=dataclasses.asdict(cfg)), f, indent=1)
    torch.save(dict(optimizers=[o.state_dict() for o in optimizers], loader=loader.state_dict(),
                    rng_cpu=torch.get_rng_state(),
                    rng_cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None),
               os.path.join(tmp, f"rank{rank}.pt"))
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    if world_size > 1:
        dist.barrier()


def load_checkpoint_meta(path: str) -> dict:
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
        raise ConfigError(f"{path} is not a complete checkpoint (no meta.json); pick another step directory")
    with open(meta_path) as f:
        return json.load(f)


# -----------------------------------------------------------------------------------------------
# Training


def setup_distributed(cfg: Hyperparameters) -> tuple[int, int, torch.device]:
    """Process group from torchrun's environment (NCCL on CUDA, gloo on CPU); world size 1 without it."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return rank, world_size, device


def mean_over_ranks(value: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world_size
    return value


def evaluate(model, cfg: Hyperparameters, step: int, rank: int, world_size: int, device, use_flex: bool) -> float:
    from data.shards import iter_val_batches

    model.eval()
    total, count = torch.zeros((), device=device), 0
    window = window_tokens_at(cfg, step)
    with torch.no_grad(), autocast(device):
        for inputs, targets in iter_val_batches(cfg.val_files, cfg.val_batch_rows, cfg.val_seq_len, cfg.val_tokens,
                                                rank=rank, world_size=world_size, device=device):
            masks = model_masks(model, inputs, window, use_flex)
            total += model(inputs, targets, masks).float()
            count += 1
    model.train()
    return mean_over_ranks(total / max(count, 1), world_size).item()


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def model_masks(model, inputs, window, use_flex):
    raw = model._orig_mod if hasattr(model, "_orig_mod") else model
    return raw.attention_masks(inputs, window, use_flex)


def optimizer_summary(opt) -> list[str]:
    """Log lines summarising a matrix optimizer's own measurements (ORD diagnostics, echo curves), if any."""
    lines = []
    diagnostics = getattr(opt, "diagnostics", None)
    if diagnostics:
        last = diagnostics[-1]
        mats = last["matrices"]
        for key in ("rho", "spectral_frac", "term_ratio", "cos_polar_w"):
            values = [m[key] for m in mats if m.get(key) is not None]
            if values:
                lines.append(f"diagnostics step {last['step']}: {key} mean {sum(values) / len(values):.4g} "
                             f"min {min(values):.4g} max {max(values):.4g} over {len(values)} matrices")
    report = getattr(opt, "echo_report", None)
    if report is not None:
        for entry in report():
            lines.append("echo curve: " + json.dumps(entry, default=float))
    return lines


def steps_to_target_line(val_losses: dict[int, float], target: float) -> str:
    """The run's steps-to-target: the first validation at or below target (runlog reads the same from the log)."""
    reached = [step for step, loss in sorted(val_losses.items()) if loss <= target]
    if reached:
        return f"steps to target val_loss {target:g}: {reached[0]}"
    return f"steps to target val_loss {target:g}: not reached (best {min(val_losses.values()):.4f})"


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def train(cfg: Hyperparameters, status: dict | None = None) -> dict:
    """Runs the whole job. Returns {"val_losses": {step: loss}, "train_losses": {step: loss}, "log_path": ...}.
    status (optional) receives "log_path" as soon as it is known, so a caller can report a failure into the log."""
    status = {} if status is None else status
    from data.shards import DistributedTokenLoader

    rank, world_size, device = setup_distributed(cfg)
    master = rank == 0
    resume_meta = None
    if cfg.resume:
        resume_meta = load_checkpoint_meta(cfg.resume)
        saved = Hyperparameters(**resume_meta["config"])
        # a resumed run keeps its identity and recipe; only loop-control fields may change
        keep = {"resume", "num_iterations", "checkpoint_every", "checkpoint_dir", "print_every",
                "debug_crash_at_step", "log_dir"}
        cfg = dataclasses.replace(saved, **{k: getattr(cfg, k) for k in keep})
        if resume_meta["world_size"] != world_size:
            raise ConfigError(f"checkpoint {cfg.resume} was written with world size {resume_meta['world_size']}, "
                              f"this launch has {world_size}; relaunch with --nproc_per_node={resume_meta['world_size']}")
    accum_steps = validate_config(cfg, world_size)
    if not cfg.run_id:
        cfg.run_id = str(uuid.uuid4())
    if world_size > 1:  # every rank uses rank 0's run id
        holder = [cfg.run_id]
        dist.broadcast_object_list(holder, src=0)
        cfg.run_id = holder[0]

    log_path = None
    if master:
        os.makedirs(cfg.log_dir, exist_ok=True)
        log_path = os.path.join(cfg.log_dir, f"{cfg.run_id}.txt")
        status["log_path"] = log_path
    log = RunLog(log_path, master)
    if resume_meta is None:
        write_log_header(log, cfg, device, world_size)
    else:
        log.write(f"resumed from {cfg.resume} at step {resume_meta['step']}")
    log.write(f"run {cfg.run_id}: preset {cfg.preset}, optimizer {cfg.optimizer}, world size {world_size}, "
              f"{accum_steps} accumulation step(s), {cfg.batch_tokens} tokens/step, device {device}; log {log_path}")

    torch.manual_seed(cfg.seed)
    model = GPT(cfg).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    log.write(f"model: {num_params / 1e6:.2f}M parameters, {cfg.num_layers} layers, d={cfg.model_dim}")
    statement = track3.benchmark_statement(cfg)
    if statement:
        log.write(statement)
    diagnostics_path = os.path.join(cfg.log_dir, f"{cfg.run_id}.{cfg.optimizer}.jsonl")
    optimizers = build_optimizers(model, cfg, diagnostics_path)
    if getattr(optimizers[1], "diagnostics_path", None):
        log.write(f"optimizer diagnostics: {optimizers[1].diagnostics_path}")
    # optimizers that estimate gradient noise (spectral_echo) take each micro-batch's gradient as a replicate
    record_replicate = getattr(optimizers[1], "add_replicate_gradients", None)
    use_flex = device.type == "cuda"
    rows = cfg.micro_batch_tokens // cfg.seq_len
    if use_flex and rows != 1 and model.needs_masks:
        raise ConfigError(f"on CUDA each rank packs one row per micro-batch: set --seq-len {cfg.micro_batch_tokens}")
    loader = DistributedTokenLoader(cfg.train_files, rows, cfg.seq_len, rank=rank, world_size=world_size,
                                    align_to_bos=cfg.align_to_bos, bos_id=cfg.bos_id, device=device)
    step_model = torch.compile(model, dynamic=False) if cfg.compile else model

    def train_step(step: int, inputs_fn) -> torch.Tensor:
        """One optimizer step at `step` (0-based count of steps done). Returns the rank-mean train loss."""
        window = window_tokens_at(cfg, step)
        loss_sum = torch.zeros((), device=device)
        for _ in range(accum_steps):
            inputs, targets = inputs_fn()
            with autocast(device):
                loss = step_model(inputs, targets, model_masks(step_model, inputs, window, use_flex))
            (loss / accum_steps).backward()
            if record_replicate is not None:
                record_replicate()
            loss_sum += loss.detach().float()
        mult, mom = lr_multiplier(cfg, step), momentum_at(cfg, step)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * mult
        for group in optimizers[1].param_groups:
            group["momentum"] = mom
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return mean_over_ranks(loss_sum / accum_steps, world_size)

    if cfg.warmup_steps > 0 and resume_meta is None:
        # untimed: compile and autotune on random tokens, then put everything back as it was
        saved_model = copy.deepcopy(model.state_dict())
        saved_opts = [copy.deepcopy(o.state_dict()) for o in optimizers]
        gen = torch.Generator().manual_seed(cfg.seed + 1)

        def random_batch():
            x = torch.randint(0, cfg.vocab_size, (rows, cfg.seq_len + 1), generator=gen).to(device)
            return x[:, :-1], x[:, 1:]

        t0 = time.perf_counter()
        for i in range(cfg.warmup_steps):
            train_step(i % max(cfg.num_iterations, 1), random_batch)
        model.load_state_dict(saved_model)
        for opt, state in zip(optimizers, saved_opts):
            opt.load_state_dict(state)
        log.write(f"warm-up: {cfg.warmup_steps} untimed steps in {time.perf_counter() - t0:.1f}s (state restored)")

    start_step, train_time_ms = 0, 0.0
    if resume_meta is not None:
        model.load_state_dict(torch.load(os.path.join(cfg.resume, "model.pt"), map_location=device))
        shard = torch.load(os.path.join(cfg.resume, f"rank{rank}.pt"), map_location="cpu", weights_only=False)
        for opt, state in zip(optimizers, shard["optimizers"]):
            opt.load_state_dict(state)
        loader.load_state_dict(shard["loader"])
        torch.set_rng_state(shard["rng_cpu"])
        if shard["rng_cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(shard["rng_cuda"])
        start_step, train_time_ms = resume_meta["step"], resume_meta["train_time_ms"]

    def checkpoint(step: int, tag: str | None = None):
        path = os.path.join(cfg.checkpoint_dir, cfg.run_id, tag or f"step_{step:06d}")
        save_checkpoint(path, model, optimizers, loader, step, train_time_ms, cfg, rank, world_size)
        log.write(f"checkpoint saved to {path}")
        return path

    val_losses, train_losses = {}, {}
    total = cfg.num_iterations
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step in range(start_step, total + 1):
        last = step == total
        if validation_due(cfg, step) and not (resume_meta is not None and step == start_step):
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_time_ms += 1000 * (time.perf_counter() - t0)  # the clock stops during validation
            val_loss = evaluate(step_model, cfg, step, rank, world_size, device, use_flex)
            val_losses[step] = val_loss
            avg = f"{train_time_ms / step:.2f}" if step > 0 else "nan"
            log.write(f"step:{step}/{total} val_loss:{val_loss:.4f} train_time:{train_time_ms:.0f}ms step_avg:{avg}ms")
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        if last:
            break
        if cfg.checkpoint_every > 0 and step > start_step and step % cfg.checkpoint_every == 0:
            train_time_ms += 1000 * (time.perf_counter() - t0)
            checkpoint(step)
            t0 = time.perf_counter()
        if step == cfg.debug_crash_at_step:
            raise RuntimeError(f"debug crash at step {step} (--debug-crash-at-step)")

        train_loss = train_step(step, loader.next_batch).item()
        if not math.isfinite(train_loss):
            msg = f"non-finite train loss ({train_loss}) at step {step + 1}; stopping"
            if cfg.checkpoint_every > 0:
                msg += f"; state kept in {checkpoint(step + 1, tag=f'step_{step + 1:06d}_nonfinite')}"
            log.write(f"error: {msg}")
            raise FloatingPointError(msg + " (lower --lr or check the data)")
        train_losses[step + 1] = train_loss
        now_ms = train_time_ms + 1000 * (time.perf_counter() - t0)
        step_avg = now_ms / (step + 1)
        line = f"step:{step + 1}/{total} train_loss:{train_loss:.4f} train_time:{now_ms:.0f}ms step_avg:{step_avg:.2f}ms"
        log.write(line, console=False)
        if master and ((step + 1) % cfg.print_every == 0 or step + 1 == total or step == start_step):
            eta = format_duration(step_avg * (total - step - 1) / 1000)
            print(f"{line} eta:{eta}", flush=True)

    if device.type == "cuda":
        log.write(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                  f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    for line in optimizer_summary(optimizers[1]):
        log.write(line)
    if cfg.val_loss_target > 0 and val_losses:
        log.write(steps_to_target_line(val_losses, cfg.val_loss_target))
    if cfg.report_unigram and master:
        from data.shards import unigram_cross_entropy
        unigram = unigram_cross_entropy(cfg.train_files, cfg.val_files, vocab_size=50257)
        log.write(f"final val_loss {val_losses[total]:.4f} vs unigram model of the same data {unigram:.4f} "
                  f"({unigram - val_losses[total]:.2f} nats lower)")
    return dict(val_losses=val_losses, train_losses=train_losses, log_path=log_path, run_id=cfg.run_id)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    status: dict = {}
    try:
        train(cfg, status)
        return 0
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except BaseException:
        if status.get("log_path") and os.path.exists(status["log_path"]):  # rank 0 only has a log path
            with open(status["log_path"], "a") as f:
                f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
