"""Parse training logs: ours (train_gpt.py) and the official modded-nanogpt record logs.

A log is: source text, a line of 100 '=', versions / hardware (ours adds one `config: {json}` line), another line
of 100 '=', then progress lines such as

    step:0/200 val_loss:10.8251 train_time:0ms step_avg:nanms
    step:1/200 train_loss:10.8143 train_time:1234ms step_avg:1234.00ms
    peak memory allocated: 123 MiB reserved: 456 MiB

(the optimizer benchmark's logs, track 3, print `train_time:503.169s` in seconds; both units are read)

with free-form lines, `error: ...` lines and Python tracebacks possibly in between. `parse_log` is the one parser
used by monitor_runs.py, plot_loss.py, make_record.py and launch_sweep.py.

Also here: the names of the side files launch_sweep.py writes next to each log (console output, status JSON),
so the launcher and the readers agree on them.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import NamedTuple

SEPARATOR = "=" * 100
SEED_SUFFIX = re.compile(r"-s(\d+)$")
_STEP_TOKEN = re.compile(r"^step:(\d+)/(\d+)$")
_PEAK_MEMORY = re.compile(r"^peak memory (?:allocated|consumption): (\d+) MiB(?: reserved: (\d+) MiB)?")


class ValPoint(NamedTuple):
    step: int
    loss: float
    train_time_ms: float  # cumulative training time (validation excluded), ms


class TrainPoint(NamedTuple):
    step: int
    loss: float | None  # None in official logs (they print no train loss)
    train_time_ms: float
    step_avg_ms: float  # nan on early steps of official logs


@dataclass
class RunLog:
    path: str
    format: str  # "ours" (config line or `# file:` markers present) or "official"
    config: dict | None
    val: list[ValPoint] = field(default_factory=list)
    train: list[TrainPoint] = field(default_factory=list)
    total_steps: int | None = None
    peak_memory_allocated_mib: int | None = None
    peak_memory_reserved_mib: int | None = None
    header_lines: list[str] = field(default_factory=list)  # versions / hardware lines between the separators
    has_traceback: bool = False
    error_lines: list[str] = field(default_factory=list)  # `error: ...` lines
    exception: str | None = None  # last line of the last traceback, e.g. "RuntimeError: debug crash at step 1"
    truncated: bool = False  # the last line had no newline and did not parse, so it was ignored
    empty: bool = False

    @property
    def tag(self) -> str:
        """The run id from the config line, else the file name without extension."""
        if self.config and self.config.get("run_id"):
            return str(self.config["run_id"])
        return os.path.splitext(os.path.basename(self.path))[0]

    @property
    def seed(self) -> int | None:
        if self.config and self.config.get("seed") is not None:
            return int(self.config["seed"])
        match = SEED_SUFFIX.search(self.tag)
        return int(match.group(1)) if match else None

    @property
    def group(self) -> str:
        """The tag with its `-s<seed>` suffix removed: runs of one config over several seeds share it."""
        return group_of(self.tag)

    @property
    def last_step(self) -> int | None:
        steps = [p.step for p in self.val] + [p.step for p in self.train]
        return max(steps) if steps else None

    @property
    def finished(self) -> bool:
        """A val_loss line at step == total exists."""
        return self.total_steps is not None and any(p.step == self.total_steps for p in self.val)

    @property
    def crashed(self) -> bool:
        return self.has_traceback or bool(self.error_lines)

    @property
    def final_val(self) -> ValPoint | None:
        """The val point at the last step (only when finished)."""
        if not self.finished:
            return None
        return [p for p in self.val if p.step == self.total_steps][-1]

    @property
    def last_val(self) -> ValPoint | None:
        return self.val[-1] if self.val else None

    def first_val_at_or_below(self, target: float) -> ValPoint | None:
        """The first validation whose loss is <= target (its step is the run's steps-to-target), else None."""
        for point in self.val:
            if math.isfinite(point.loss) and point.loss <= target:
                return point
        return None

    def target(self, default: float) -> float:
        """The val loss target the run was configured with (config `val_loss_target`, 0 = none), else default."""
        value = (self.config or {}).get("val_loss_target")
        return float(value) if isinstance(value, (int, float)) and value > 0 else default

    def summary(self, target: float) -> dict:
        """The run in one dict: progress, final and best val loss, and steps-to-target (the step of the first
        validation at or below target, None if none) with the training time up to it."""
        final, reached = self.final_val, self.first_val_at_or_below(target)
        return {
            "tag": self.tag, "seed": self.seed, "finished": self.finished, "crashed": self.crashed,
            "last_step": self.last_step, "total_steps": self.total_steps,
            "final_val_loss": final.loss if final else None, "best_val_loss": self.best_val_loss,
            "target": target, "steps_to_target": reached.step if reached else None,
            "train_time_to_target_s": reached.train_time_ms / 1000 if reached else None,
        }

    def val_at(self, step: int) -> ValPoint | None:
        """The validation at this step (the last one logged there), else None."""
        found = [p for p in self.val if p.step == step]
        return found[-1] if found else None

    @property
    def best_val_loss(self) -> float | None:
        finite = [p.loss for p in self.val if math.isfinite(p.loss)]
        return min(finite) if finite else None

    @property
    def train_time_ms(self) -> float | None:
        """Latest cumulative training time seen on any progress line, ms."""
        points = [(p.step, p.train_time_ms) for p in self.val] + [(p.step, p.train_time_ms) for p in self.train]
        return max(points)[1] if points else None

    @property
    def step_avg_ms(self) -> float | None:
        """Latest finite step_avg, else train_time / step; ms per step."""
        for point in reversed(self.train):
            if math.isfinite(point.step_avg_ms):
                return point.step_avg_ms
        step, time_ms = self.last_step, self.train_time_ms
        if step and time_ms:
            return time_ms / step
        return None


def group_of(tag: str) -> str:
    return SEED_SUFFIX.sub("", tag)


def _parse_number(text: str, suffix: str = "") -> float | None:
    if suffix:
        if not text.endswith(suffix):
            return None
        text = text[: -len(suffix)]
    try:
        return float(text)  # accepts "nan"
    except ValueError:
        return None


def parse_progress_line(line: str) -> tuple[int, int, dict[str, float]] | None:
    """`step:A/B key:value ...` -> (A, B, {key: value}); None if the line is not a complete progress line.

    Values: val_loss / train_loss as floats, train_time / step_avg in ms. A unit suffix is required (`ms`; train_time
    may also be in seconds, `s`, as the track-3 logs print it), so a line cut off in the middle of a number is
    rejected. Unknown keys are kept if numeric.
    """
    tokens = line.split()
    if not tokens:
        return None
    match = _STEP_TOKEN.match(tokens[0])
    if not match:
        return None
    fields: dict[str, float] = {}
    for token in tokens[1:]:
        key, sep, raw = token.partition(":")
        if not sep:
            return None
        value = _parse_number(raw, "ms" if key in ("train_time", "step_avg") else "")
        if value is None and key == "train_time":
            seconds = _parse_number(raw, "s")
            value = None if seconds is None else 1000 * seconds
        if value is None:
            return None
        fields[key] = value
    if "train_time" not in fields:
        return None
    return int(match.group(1)), int(match.group(2)), fields


def parse_log(path: str | os.PathLike) -> RunLog:
    """Read one log file (ours or official). Never raises on odd content; raises OSError if unreadable."""
    path = os.fspath(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    log = RunLog(path=path, format="official", config=None)
    if not text.strip():
        log.empty = True
        return log
    lines = text.split("\n")
    last_complete = text.endswith("\n")
    if last_complete:
        lines.pop()  # the empty string after the final newline
    separators = [i for i, line in enumerate(lines) if line.rstrip("\r") == SEPARATOR]
    if lines[0].startswith("# file:"):
        log.format = "ours"
    # Header = between the first two separators; progress = after the second. A log still writing its header
    # has no progress yet; a log without separators (hand-made) is read as all progress.
    if len(separators) >= 2:
        header = lines[separators[0] + 1 : separators[1]]
        body_start = separators[1] + 1
    elif len(separators) == 1:
        header = lines[separators[0] + 1 :]
        body_start = len(lines)
    else:
        header, body_start = [], 0
    for line in header:
        if line.startswith("config:"):
            try:
                config = json.loads(line[len("config:") :])
            except json.JSONDecodeError:
                continue  # a config line cut off while being written
            if isinstance(config, dict):
                log.config = config
                log.format = "ours"
        else:
            log.header_lines.append(line.rstrip("\r"))
    in_traceback = False
    for index in range(body_start, len(lines)):
        line = lines[index].rstrip("\r")
        is_last_incomplete = index == len(lines) - 1 and not last_complete
        parsed = parse_progress_line(line)
        if parsed is not None:
            step, total, fields = parsed
            log.total_steps = total
            if "val_loss" in fields:
                log.val.append(ValPoint(step, fields["val_loss"], fields["train_time"]))
            else:
                if "train_loss" in fields:
                    log.format = "ours"
                log.train.append(
                    TrainPoint(step, fields.get("train_loss"), fields["train_time"], fields.get("step_avg", math.nan))
                )
            continue
        if is_last_incomplete:
            log.truncated = True  # a partial line of a log still being written
            continue
        memory = _PEAK_MEMORY.match(line)
        if memory:
            log.peak_memory_allocated_mib = int(memory.group(1))
            if memory.group(2):
                log.peak_memory_reserved_mib = int(memory.group(2))
        elif line.startswith("Traceback (most recent call last):"):
            log.has_traceback = in_traceback = True
        elif line.startswith("error:"):
            log.error_lines.append(line)
        elif in_traceback and line.strip() and not line[0].isspace():
            # Frames are indented; the first unindented line is "ExceptionType: message".
            if not line.startswith("During handling") and not line.startswith("The above exception"):
                log.exception = line
                in_traceback = False
    return log


# Side files written by launch_sweep.py next to <log_dir>/<tag>.txt.
def console_path(log_dir: str, tag: str) -> str:
    return os.path.join(log_dir, f"{tag}.console.log")


def status_path(log_dir: str, tag: str) -> str:
    return os.path.join(log_dir, f"{tag}.status.json")


def log_path(log_dir: str, tag: str) -> str:
    return os.path.join(log_dir, f"{tag}.txt")


def read_status(path: str) -> dict | None:
    """The launcher's status JSON, or None if missing or unreadable (e.g. caught mid-write)."""
    try:
        with open(path, encoding="utf-8") as f:
            status = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return status if isinstance(status, dict) else None


def write_status(path: str, status: dict) -> None:
    """Write atomically (temp file + rename) so a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(status, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def is_run_log(path: str) -> bool:
    """Run logs are the *.txt files; console logs, status files and old attempts are not."""
    name = os.path.basename(path)
    return name.endswith(".txt") and not name.endswith(".console.txt")


def find_logs(paths: list[str]) -> list[str]:
    """Expand files, directories (searched recursively for *.txt) and glob patterns into sorted log paths."""
    import glob

    found: list[str] = []
    for item in paths:
        if os.path.isdir(item):
            for root, _dirs, files in os.walk(item):
                found.extend(os.path.join(root, name) for name in files if is_run_log(name))
        elif os.path.isfile(item):
            found.append(item)
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise ValueError(f"no log matches {item!r}: pass a log file, a directory of logs or a glob pattern")
            for match in matches:
                if os.path.isdir(match):
                    found.extend(find_logs([match]))
                elif is_run_log(match):
                    found.append(match)
    # Keep order of first appearance, drop duplicates.
    return list(dict.fromkeys(os.path.normpath(p) for p in found))


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Plain-text table with left-aligned columns and a dashed rule under the header."""
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
