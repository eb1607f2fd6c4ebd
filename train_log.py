"""Per-step train losses without a host sync per step, and the buffered writer of the log's step lines.

A `.item()` on every step's loss makes the host wait for the device once per step, so the host can no longer
queue the next step's kernels while the device works. Here each step's loss stays on the device:

  - `DeviceLosses` keeps the rank-mean loss of every step since the last read in one device tensor. With a
    process group each step's 0-D loss is all-reduced on the device as it is recorded (a 4-byte collective that
    the host does not wait for under NCCL), so reading the buffer needs no collective: it is one device-to-host
    copy, which a crashing rank can still do alone.
  - `BufferedStepLog` turns the buffer into the log's per-step lines, byte for byte the lines the loop wrote
    when it synced every step (`train_line`):

        step:12/200 train_loss:4.1235 train_time:1234ms step_avg:102.83ms

    It flushes every `flush_every` steps, whenever the loop asks (before a validation line, at the end), and on
    the way out of a `with` block that ends in an exception, so that every finished step is in the log.

train_time on a step line is the host's clock when the step had been queued; the loop stops the clock with a
device sync only at validation, so times are exact there and the per-step values between are the host's view
(record 18 logs the same). Losses are read at a flush, so a non-finite loss is found at the flush after it:
`flush()` writes the lines before it and returns that step and loss for the loop to stop on.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.distributed as dist


def train_line(step: int, total: int, train_loss: float, train_time_ms: float) -> str:
    """One progress line of the log: step `step` (1-based count of steps done) of `total`."""
    return (f"step:{step}/{total} train_loss:{train_loss:.4f} train_time:{train_time_ms:.0f}ms "
            f"step_avg:{train_time_ms / step:.2f}ms")


def format_duration(seconds: float) -> str:
    """"1h05m" from an hour up, else "3m07s"."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class DeviceLosses:
    """Rank-mean per-step losses held on the device, read to the host in one transfer.

    record(loss): loss is this rank's 0-D loss of one step (any float dtype); it is summed over ranks on the
    device and kept (float32). read(): the recorded values / world_size as Python floats, oldest first, and the
    buffer is empty again. Sum then divide is the same float32 arithmetic as an all-reduce of the loss followed
    by a division, so the values equal those of a per-step `.item()` of the rank mean.
    """

    def __init__(self, capacity: int, device: torch.device | str, world_size: int = 1):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 (steps held between reads), got {capacity}")
        self.values = torch.zeros(capacity, dtype=torch.float32, device=device)  # (capacity,) rank sums
        self.world_size = world_size
        self.count = 0

    def record(self, loss: torch.Tensor) -> None:
        if self.count == self.values.numel():
            raise RuntimeError(f"DeviceLosses holds {self.count} steps already: read() before recording more")
        value = loss.detach().float().reshape(())
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        self.values[self.count].copy_(value)
        self.count += 1

    def read(self) -> list[float]:
        """The recorded losses as floats (one device sync); empties the buffer."""
        if self.count == 0:
            return []
        held = self.values[:self.count]
        values = (held / self.world_size if self.world_size > 1 else held).tolist()
        self.count = 0
        return values


class LogWriter(Protocol):
    master: bool

    def write(self, line: str, console: bool = True) -> None: ...


class BufferedStepLog:
    """Writes the per-step lines of the log from a `DeviceLosses` buffer; see the module docstring.

    add(step, loss, train_time_ms) after each optimizer step (step: steps done, 1-based; loss: the rank's 0-D mean
    over micro-batches; train_time_ms: the run's training clock). Console: rank 0 prints a step's line with an
    ETA when step % print_every == 0, at the last step and at the first step this process runs (as before).
    `train_losses` collects {step: loss} of every line written.
    """

    def __init__(self, log: LogWriter, total: int, device: torch.device | str, world_size: int = 1,
                 flush_every: int = 50, print_every: int = 1, first_step: int = 1):
        if flush_every < 1 or print_every < 1:
            raise ValueError(f"flush_every and print_every must be >= 1, got {flush_every} and {print_every}")
        self.log, self.total, self.flush_every, self.print_every = log, total, flush_every, print_every
        self.first_step = first_step
        self.losses = DeviceLosses(flush_every, device, world_size)
        self.pending: list[tuple[int, float]] = []  # (step, train_time_ms) of the buffered steps
        self.train_losses: dict[int, float] = {}

    def add(self, step: int, loss: torch.Tensor, train_time_ms: float) -> tuple[int, float] | None:
        """Buffer one step; flushes when the buffer is full and returns what flush() returns (else None)."""
        self.losses.record(loss)
        self.pending.append((step, train_time_ms))
        return self.flush() if len(self.pending) >= self.flush_every else None

    def flush(self) -> tuple[int, float] | None:
        """Write the buffered steps' lines. Returns (step, loss) of the first non-finite loss, whose line and
        those after it are not written, or None."""
        pending, self.pending = self.pending, []
        for (step, time_ms), loss in zip(pending, self.losses.read()):
            if not math.isfinite(loss):
                return step, loss
            self.train_losses[step] = loss
            line = train_line(step, self.total, loss, time_ms)
            self.log.write(line, console=False)
            if self.log.master and (step % self.print_every == 0 or step == self.total or step == self.first_step):
                eta = format_duration(time_ms / step * (self.total - step) / 1000)
                print(f"{line} eta:{eta}", flush=True)
        return None

    def __enter__(self) -> BufferedStepLog:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.pending:
            return False
        if exc_type is None:  # a normal end with steps still buffered: write them, and stop on a bad loss
            bad = self.flush()
            if bad is not None:
                raise FloatingPointError(f"non-finite train loss ({bad[1]}) at step {bad[0]}")
            return False
        steps = f"{self.pending[0][0]}-{self.pending[-1][0]}"
        try:
            self.flush()  # every finished step into the log before the exception goes on
        except Exception as read_error:  # e.g. the device itself failed: say which steps are missing
            self.log.write(f"error: the train losses of steps {steps} could not be read from the device "
                           f"({type(read_error).__name__}: {read_error})")
        return False
