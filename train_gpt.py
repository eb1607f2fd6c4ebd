"""GPT-2 Medium speedrun training with pluggable matrix optimizers.

    torchrun --standalone --nproc_per_node=8 train_gpt.py              # medium track, 8x H100
    python train_gpt.py                                                # without CUDA: preset cpu-bytes

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

from config import (MATRIX_ROLES, ConfigError, Hyperparameters, parse_config,  # noqa: E402
                    parse_matrix_lr_muls, parse_optimizer_args, validate_config)
import track3  # noqa: E402
from attention import needs_masks  # noqa: E402
from model import GPT  # noqa: E402
from schedules import (format_schedule_table, forwards_per_step, schedule_at, short_window_tokens,  # noqa: E402
                       untie_step, validation_due, warmup_plan)
from train_log import BufferedStepLog  # noqa: E402
# re-exported: spectral_probe.py and bench/optimizer_race.py run their own steps with the loop's schedules
from schedules import lr_multiplier, momentum_at, window_tokens_at  # noqa: E402,F401


# -----------------------------------------------------------------------------------------------
# Optimizers


def build_optimizers(model: GPT, cfg: Hyperparameters, diagnostics_path: str | None = None
                     ) -> list[torch.optim.Optimizer]:
    """[DistAdam, matrix optimizer]. Hidden matrices (model roles attn, mlp_in, mlp_out, gate) -> the chosen matrix
    optimizer, one group per role with group keys lr_mul (--matrix-lr-muls), shape_scale, cautious_weight_decay
    and weight_decay_mul; embeddings, head, one-output gates and scalars -> DistAdam, one group per role with its
    own lr (Adam weight decay on embeddings and head only). Every parameter lands in exactly one group (asserted).
    Optimizers that take `param_names` get the hidden matrices' names; those that write diagnostics get
    `diagnostics_path` unless --optimizer-args sets one."""
    from optimizers import DistAdam, get_optimizer_class

    roles = model.parameter_roles()

    def params(role: str) -> list[torch.nn.Parameter]:
        return [p for _, p in roles.get(role, [])]

    embed_decay, value_decay = cfg.embed_head_weight_decay_mul, cfg.value_embed_weight_decay_mul
    adam_groups = [dict(params=params("embed"), lr=cfg.embed_lr, weight_decay_mul=embed_decay),
                   dict(params=params("value_embed"), lr=cfg.value_embed_lr or cfg.embed_lr, weight_decay_mul=value_decay),
                   dict(params=params("second_embed"), lr=cfg.second_embed_lr, weight_decay_mul=value_decay),
                   dict(params=params("head"), lr=cfg.head_lr, weight_decay_mul=embed_decay),
                   dict(params=params("vector_gate"), lr=cfg.gate_lr, weight_decay_mul=0.0),
                   dict(params=params("x0_lambda"), lr=cfg.x0_lambda_lr or cfg.scalar_lr, weight_decay_mul=0.0),
                   dict(params=params("scalar"), lr=cfg.scalar_lr, betas=(cfg.scalar_beta1, cfg.scalar_beta2),
                        weight_decay_mul=cfg.scalar_weight_decay_mul)]
    matrix_cls = get_optimizer_class(cfg.optimizer)
    accepted = inspect.signature(matrix_cls.__init__).parameters
    lr_muls = parse_matrix_lr_muls(cfg.matrix_lr_muls)
    matrix_groups = []
    for role in MATRIX_ROLES:
        group = dict(params=params(role), lr_mul=lr_muls[role], shape_scale=cfg.matrix_shape_scale,
                     cautious_weight_decay=cfg.cautious_weight_decay,
                     weight_decay_mul=cfg.mlp_weight_decay_mul if role.startswith("mlp") else 1.0)
        if role == "gate" and "neuron_axis" in accepted:  # one neuron per head: (heads, gate_dims), as the record
            group["neuron_axis"] = "rows"
        matrix_groups.append(group)
    adam_groups = [g for g in adam_groups if g["params"]]
    matrix_groups = [g for g in matrix_groups if g["params"]]
    grouped = [p for g in adam_groups + matrix_groups for p in g["params"]]
    assert len({id(p) for p in grouped}) == len(grouped) == len(list(model.parameters())), \
        "every parameter must land in exactly one optimizer group"

    adam = DistAdam(adam_groups, lr=cfg.scalar_lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                    weight_decay=cfg.adam_weight_decay, cautious_weight_decay=cfg.cautious_weight_decay,
                    step_every=cfg.adam_step_every, state_dtype=torch.bfloat16 if cfg.bf16_storage else None)
    kwargs = parse_optimizer_args(cfg.optimizer_args)
    if "param_names" in accepted:
        kwargs.setdefault("param_names", [name for role in MATRIX_ROLES for name, _ in roles.get(role, [])])
    if "diagnostics_path" in accepted and kwargs.get("diagnostics_every", 0) and diagnostics_path:
        kwargs.setdefault("diagnostics_path", diagnostics_path)
    try:
        matrix = matrix_cls(matrix_groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"--optimizer-args {cfg.optimizer_args!r} do not fit {matrix_cls.__name__}: {exc}") from exc
    for opt in (adam, matrix):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return [adam, matrix]


# record 18 keeps these in bf16 (its nn.Embedding and nn.Linear weights); hidden matrices and scalars stay fp32
BF16_STORAGE_ROLES = ("embed", "value_embed", "second_embed", "head", "vector_gate", "gate")


@torch.no_grad()
def apply_bf16_storage(model: GPT) -> list[str]:
    """--bf16-storage: store the embeddings, the head and the gates in bf16 (in place: the Parameter objects stay,
    so call it before building the optimizers). Returns the names of the converted parameters."""
    converted = []
    for role in BF16_STORAGE_ROLES:
        for name, p in model.parameter_roles().get(role, []):
            p.data = p.data.to(torch.bfloat16)
            converted.append(name)
    return converted


@torch.no_grad()
def untie_embedding(model: GPT, adam: torch.optim.Optimizer) -> None:
    """Split the input embedding from the head (record 18, after the step of schedules.untie_step): the embedding
    starts as a copy of the head's weight and of the head's Adam state (this rank's rows of it)."""
    head, embed = model.head.weight, model.embed.weight
    model.untie()
    if head in adam.state:
        adam.state[embed] = {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
                             for k, v in adam.state[head].items()}


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
        meta = json.load(f)
    missing = {"step", "train_time_ms", "world_size", "config"} - set(meta)
    unknown = set(meta.get("config", {})) - {f.name for f in dataclasses.fields(Hyperparameters)}
    if missing or unknown:
        raise ConfigError(f"{meta_path} lacks {sorted(missing)} or has unknown config fields {sorted(unknown)}: it was "
                          "not written by this version of train_gpt.py; resume it with the version that wrote it")
    return meta


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
        if cfg.cpu_threads > 0:
            torch.set_num_threads(cfg.cpu_threads)
    if world_size > 1 and not dist.is_initialized():
        from optimizers.distributed import start_process_group
        start_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return rank, world_size, device


def mean_over_ranks(value: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world_size
    return value


def evaluate(model, cfg: Hyperparameters, step: int, rank: int, world_size: int, device, use_flex: bool) -> float:
    """Mean val loss at this step's schedule (the final window at the last step), averaged over ranks."""
    from data.shards import iter_val_batches

    raw = model._orig_mod if hasattr(model, "_orig_mod") else model
    schedule = schedule_at(cfg, step, final=step == cfg.num_iterations)
    raw.apply_schedule(schedule)
    model.eval()
    total, count = torch.zeros((), device=device), 0
    # FlexAttention packs one row of val_seq_len tokens. The dense CPU path and plain causal attention score the same
    # tokens as rows of the training length seq_len (when it divides val_seq_len), so every position has the context
    # it had in training.
    one_row = (use_flex and needs_masks(cfg)) or cfg.val_seq_len % cfg.seq_len
    rows = 1 if one_row else cfg.val_seq_len // cfg.seq_len
    with torch.no_grad(), autocast(device):
        for inputs, targets in iter_val_batches(cfg.val_files, rows, cfg.val_seq_len // rows, cfg.val_tokens,
                                                rank=rank, world_size=world_size, device=device):
            masks = model_masks(model, inputs, schedule.long_window, use_flex)
            total += model(inputs, targets, masks).float()
            count += 1
    model.train()
    return mean_over_ranks(total / max(count, 1), world_size).item()


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def model_masks(model, inputs, long_window: int, use_flex: bool) -> dict:
    """Attention masks for a long window (tokens); the short layers' window follows schedules.short_window_tokens."""
    raw = model._orig_mod if hasattr(model, "_orig_mod") else model
    return raw.attention_masks(inputs, long_window, short_window_tokens(raw.cfg, long_window), use_flex)


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


def baseline_lines(cfg: Hyperparameters, final_val_loss: float) -> list[str]:
    """The final val loss against unigram and bigram models of the train tokens, scored on the same val tokens
    (add-one smoothing over the model's vocab_size; see data.shards)."""
    from data.shards import bigram_cross_entropy, unigram_cross_entropy

    lines = []
    for name, baseline in (("unigram", unigram_cross_entropy), ("bigram", bigram_cross_entropy)):
        value = baseline(cfg.train_files, cfg.val_files, vocab_size=cfg.vocab_size, val_tokens=cfg.val_tokens)
        lines.append(f"final val_loss {final_val_loss:.4f} vs {name} model of the same data {value:.4f} "
                     f"({value - final_val_loss:.2f} nats lower)")
    return lines


def steps_to_target_line(val_losses: dict[int, float], target: float) -> str:
    """The run's steps-to-target: the first validation at or below target (runlog reads the same from the log)."""
    reached = [step for step, loss in sorted(val_losses.items()) if loss <= target]
    if reached:
        return f"steps to target val_loss {target:g}: {reached[0]}"
    return f"steps to target val_loss {target:g}: not reached (best {min(val_losses.values()):.4f})"


def make_train_loader(cfg: Hyperparameters, rank: int, world_size: int, device: torch.device):
    """A loader with next_batch(tokens) -> this rank's (inputs, targets) of one forward: documents packed into one
    row of `tokens` (--pack-documents), or rows of seq_len tokens (then `tokens` is always micro_batch_tokens),
    drawn at random from cfg.seed (--sample-rows) or read in order."""
    from data.shards import DistributedTokenLoader, PackedDocumentLoader

    if cfg.pack_documents:
        return PackedDocumentLoader(cfg.train_files, rank=rank, world_size=world_size, max_doc_tokens=cfg.max_doc_tokens,
                                    bos_id=cfg.bos_id, device=device)
    return DistributedTokenLoader(cfg.train_files, cfg.micro_batch_tokens // cfg.seq_len, cfg.seq_len, rank=rank,
                                  world_size=world_size, align_to_bos=cfg.align_to_bos, bos_id=cfg.bos_id,
                                  device=device, sample_seed=cfg.seed if cfg.sample_rows else None)


def compile_model(cfg: Hyperparameters, model: GPT):
    """torch.compile(model) with cfg.compile (one graph per schedule transition: batch size, MTP stage, tie state;
    and one for validation), else the model itself."""
    if not cfg.compile:
        return model
    import torch._dynamo as dynamo
    dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)
    return torch.compile(model, dynamic=False)


def batch_source(cfg: Hyperparameters, loader):
    """next_batch(tokens) -> this rank's (inputs, targets) of one forward. The row loader's forwards are always
    micro_batch_tokens (validate_config refuses a batch schedule with it)."""
    return loader.next_batch if cfg.pack_documents else (lambda tokens: loader.next_batch())


def make_train_step(cfg: Hyperparameters, model: GPT, step_model, optimizers: list[torch.optim.Optimizer],
                    device: torch.device, accum_steps: int):
    """train_step(step, next_batch) -> this rank's mean train loss per target token over the step's forwards, a 0-D
    device tensor that nothing waits on. `step` is the 0-based count of steps done; next_batch(tokens) gives one
    forward's (inputs, targets).

    With cfg.overlap_comm, Adam's gradients are reduced inside the last forward's backward (DistAdam's hooks) and
    the matrix optimizer's reductions are launched as soon as backward ends, before Adam's update runs; the
    results are bit-identical to starting every reduction in step() (tests/test_optimizers.py)."""
    adam, matrix = optimizers
    arm, launch = None, None
    if cfg.overlap_comm:
        adam.register_grad_hooks()
        arm, launch = adam.arm_grad_hooks, getattr(matrix, "launch_reductions", None)
    # optimizers that estimate gradient noise (spectral_echo) take each micro-batch's gradient as a replicate
    record_replicate = getattr(matrix, "add_replicate_gradients", None)
    use_flex = device.type == "cuda"
    forwards, split_step = forwards_per_step(cfg), untie_step(cfg)

    def train_step(step: int, next_batch) -> torch.Tensor:
        schedule = schedule_at(cfg, step)
        model.apply_schedule(schedule)
        mtp = torch.tensor(schedule.mtp_weights, device=device) if len(schedule.mtp_weights) > 1 else None
        loss_sum = torch.zeros((), device=device)
        for i in range(accum_steps):
            inputs, targets = next_batch(schedule.tokens // forwards)
            if arm is not None and i == accum_steps - 1:
                arm()  # Adam's reductions start inside this backward
            with autocast(device):
                loss = step_model(inputs, targets, model_masks(step_model, inputs, schedule.long_window, use_flex), mtp)
            (loss / accum_steps).backward()
            if record_replicate is not None:
                record_replicate()
            loss_sum += loss.detach().float() / (targets.numel() if cfg.sum_train_loss else 1)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * schedule.lr_mult
        for group in matrix.param_groups:
            group["momentum"] = schedule.momentum
        if launch is not None:
            launch()  # the matrix reductions run while Adam updates
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        if step == split_step:
            untie_embedding(model, adam)
        return loss_sum / accum_steps

    return train_step


def run_warmup(cfg: Hyperparameters, model: GPT, optimizers: list[torch.optim.Optimizer], train_step,
               device: torch.device, log: RunLog) -> list[int]:
    """Untimed compile warm-up: train_step at every step of schedules.warmup_plan (every schedule transition and
    the steps on either side) on random tokens, then the model and optimizer states put back. Returns the steps."""
    plan = warmup_plan(cfg)
    if not plan:
        return plan
    saved_model = copy.deepcopy(model.state_dict())
    saved_opts = [copy.deepcopy(o.state_dict()) for o in optimizers]
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    rows = 1 if cfg.pack_documents else cfg.micro_batch_tokens // cfg.seq_len  # rows per forward

    def random_batch(tokens: int):
        x = torch.randint(0, cfg.vocab_size, (rows, tokens // rows + 1), generator=gen).to(device)
        return x[:, :-1], x[:, 1:]

    t0 = time.perf_counter()
    for i, step in enumerate(plan):
        train_step(step, random_batch)
        log.write(f"warm-up step {i} (schedule step {step}): {time.perf_counter() - t0:.1f}s")  # compiles show
    model.load_state_dict(saved_model)
    for opt, state in zip(optimizers, saved_opts):
        opt.load_state_dict(state)
    log.write(f"warm-up: {len(plan)} untimed steps in {time.perf_counter() - t0:.1f}s (state restored; every "
              f"schedule transition and the steps on either side)")
    return plan


def train(cfg: Hyperparameters, status: dict | None = None) -> dict:
    """Runs the whole job. Returns {"val_losses": {step: loss}, "train_losses": {step: loss}, "log_path": ...}.
    status (optional) receives "log_path" as soon as it is known, so a caller can report a failure into the log."""
    status = {} if status is None else status
    rank, world_size, device = setup_distributed(cfg)
    master = rank == 0
    resume_meta = None
    if cfg.resume:
        resume_meta = load_checkpoint_meta(cfg.resume)
        saved = Hyperparameters(**resume_meta["config"])
        # a resumed run keeps its identity and recipe; only loop-control fields may change
        keep = {"resume", "num_iterations", "checkpoint_every", "checkpoint_dir", "print_every", "log_flush_every",
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
    tokens = cfg.batch_schedule or cfg.batch_tokens
    log.write(f"run {cfg.run_id}: preset {cfg.preset}, optimizer {cfg.optimizer}, world size {world_size}, "
              f"{accum_steps} accumulation step(s), tokens/step {tokens}, device {device}; log {log_path}")

    torch.manual_seed(cfg.seed)
    model = GPT(cfg).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    log.write(f"model: {num_params / 1e6:.2f}M parameters, {cfg.num_layers} layers, d={cfg.model_dim}")
    statement = track3.benchmark_statement(cfg)
    if statement:
        log.write(statement)
    if cfg.bf16_storage:
        log.write(f"bf16 storage (Adam moments in bf16 too): {', '.join(apply_bf16_storage(model))}")
    diagnostics_path = os.path.join(cfg.log_dir, f"{cfg.run_id}.{cfg.optimizer}.jsonl")
    optimizers = build_optimizers(model, cfg, diagnostics_path)
    if getattr(optimizers[1], "diagnostics_path", None):
        log.write(f"optimizer diagnostics: {optimizers[1].diagnostics_path}")
    use_flex = device.type == "cuda"
    loader = make_train_loader(cfg, rank, world_size, device)
    step_model = compile_model(cfg, model)
    train_step = make_train_step(cfg, model, step_model, optimizers, device, accum_steps)
    if resume_meta is None:
        run_warmup(cfg, model, optimizers, train_step, device, log)

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

    next_batch = batch_source(cfg, loader)

    def checkpoint(step: int, tag: str | None = None):
        path = os.path.join(cfg.checkpoint_dir, cfg.run_id, tag or f"step_{step:06d}")
        save_checkpoint(path, model, optimizers, loader, step, train_time_ms, cfg, rank, world_size)
        log.write(f"checkpoint saved to {path}")
        return path

    val_losses = {}
    total = cfg.num_iterations
    steps_log = BufferedStepLog(log, total, device, world_size, flush_every=cfg.log_flush_every,
                                print_every=cfg.print_every, first_step=start_step + 1)

    def write_step_lines(done: int) -> None:
        """The buffered step lines into the log (a device sync); stop on a non-finite loss among them."""
        bad = steps_log.flush()
        if bad is not None:
            stop_on_non_finite(*bad, done)

    def stop_on_non_finite(bad_step: int, loss: float, done: int) -> None:
        msg = f"non-finite train loss ({loss}) at step {bad_step}; stopping"
        if cfg.checkpoint_every > 0:  # the losses are read every log_flush_every steps: the state is of step `done`
            msg += f"; state after step {done} kept in {checkpoint(done, tag=f'step_{done:06d}_nonfinite')}"
        log.write(f"error: {msg}")
        raise FloatingPointError(msg + " (lower --lr or check the data)")

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with steps_log:  # an exception still writes every finished step's line
        for step in range(start_step, total + 1):
            last = step == total
            if validation_due(cfg, step) and not (resume_meta is not None and step == start_step):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                train_time_ms += 1000 * (time.perf_counter() - t0)  # the clock stops during validation
                write_step_lines(step)
                val_loss = evaluate(step_model, cfg, step, rank, world_size, device, use_flex)
                val_losses[step] = val_loss
                avg = f"{train_time_ms / step:.2f}" if step > 0 else "nan"
                log.write(f"step:{step}/{total} val_loss:{val_loss:.4f} train_time:{train_time_ms:.0f}ms "
                          f"step_avg:{avg}ms")
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            if last:
                break
            if cfg.checkpoint_every > 0 and step > start_step and step % cfg.checkpoint_every == 0:
                if device.type == "cuda":
                    torch.cuda.synchronize()  # the queued steps finish inside the clock
                train_time_ms += 1000 * (time.perf_counter() - t0)
                write_step_lines(step)
                checkpoint(step)
                t0 = time.perf_counter()
            if step == cfg.debug_crash_at_step:
                raise RuntimeError(f"debug crash at step {step} (--debug-crash-at-step)")

            loss = train_step(step, next_batch)  # stays on the device: no host sync per step
            now_ms = train_time_ms + 1000 * (time.perf_counter() - t0)  # the host's clock (exact at validation)
            bad = steps_log.add(step + 1, loss, now_ms)
            if bad is not None:
                stop_on_non_finite(*bad, step + 1)

    if device.type == "cuda":
        log.write(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                  f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    for line in optimizer_summary(optimizers[1]):
        log.write(line)
    if cfg.val_loss_target > 0 and val_losses:
        log.write(steps_to_target_line(val_losses, cfg.val_loss_target))
    if cfg.report_baselines and master:
        for line in baseline_lines(cfg, val_losses[total]):
            log.write(line)
    return dict(val_losses=val_losses, train_losses=steps_log.train_losses, log_path=log_path, run_id=cfg.run_id)


def dry_run(cfg: Hyperparameters) -> int:
    """--dry-run: the resolved config and the schedule table at this launch's world size (WORLD_SIZE, default 1),
    after the checks that need no data; reads no data and touches no GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    try:
        accum_steps = validate_config(cfg, world_size, check_data=False, check_device=False)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        print("config: " + json.dumps(dataclasses.asdict(cfg), indent=1))
        print(f"\npreset {cfg.preset}: {cfg.num_iterations} steps, world size {world_size}, {accum_steps} "
              f"accumulation step(s) per optimizer step\n")
        statement = track3.benchmark_statement(cfg)
        if statement:
            print(statement + "\n")
        print(format_schedule_table(cfg, world_size), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    if cfg.dry_run:
        return dry_run(cfg)
    status: dict = {}
    try:
        train(cfg, status)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        if dist.is_initialized():  # every rank raises it alike, with no collective in flight
            dist.destroy_process_group()
        return 2
    except BaseException:
        if status.get("log_path") and os.path.exists(status["log_path"]):  # rank 0 only has a log path
            with open(status["log_path"], "a") as f:
                f.write(traceback.format_exc())
        raise
    # Teardown on the success path only (optimizers/distributed.py, close_process_group): a barrier, then the
    # process group is destroyed and gloo's threads joined before the interpreter shuts down. After an error
    # the group is left to process exit: a barrier or a join could wait on a collective a failed rank never joins.
    from optimizers.distributed import close_process_group
    survivors = close_process_group()
    if survivors:
        print(f"warning: gloo threads outlived the process group teardown: {survivors}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
