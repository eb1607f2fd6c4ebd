"""Async collectives and process-group teardown (issue 15: "terminate called without an active exception").

Every collective an optimizer step starts is waited on before step() returns, and before an error in the step
propagates: checked with recording stand-ins for the torch.distributed collectives at world size 2, from both
ranks (rank 1 owns nothing in the (5, 5) bucket), on ordinary steps and on the fit steps of every spectral-echo
mode. close_process_group() leaves no gloo thread alive: checked on a real one-rank gloo group in this process; the
2-rank workers (tests/dist_optim_worker.py, tests/test_spectral_echo.py) check the same after their real runs.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import optimizers.distributed as sharded
from optimizers import AdamWMatrix, DistAdam, Muon, NorMuon, SpectralEcho, SpectralORD
from optimizers.distributed import close_process_group, gloo_threads, start_process_group, wait_for_all

WORLD = 2
SHAPES = [(8, 12), (8, 12), (12, 8), (8, 12), (2, 6, 10), (5, 5), (6,)]


class RecordedWork:
    """Stand-in for an async work handle; remembers whether it was waited on."""

    def __init__(self, name: str, fail: bool = False):
        self.name, self.fail, self.waited = name, fail, False

    def wait(self) -> bool:
        self.waited = True
        if self.fail:
            raise RuntimeError(f"{self.name}: connection closed by peer")
        return True

    def is_completed(self) -> bool:
        return self.waited


@pytest.fixture
def two_fake_ranks(monkeypatch, request):
    """Collectives of a 2-rank world in which both ranks hold this rank's data; returns the started works."""
    rank = request.param
    started: list[RecordedWork] = []

    def handle(name, async_op):
        if not async_op:
            return None
        started.append(RecordedWork(name))
        return started[-1]

    def reduce_scatter(out, inp, op=None, group=None, async_op=False):
        out.copy_(inp.chunk(WORLD)[rank] * WORLD)
        return handle("reduce_scatter", async_op)

    def all_gather(out, inp, group=None, async_op=False):
        out.copy_(torch.cat([inp] * WORLD))
        return handle("all_gather", async_op)

    def all_reduce(tensor, op=None, group=None, async_op=False):
        tensor.mul_(WORLD)
        return handle("all_reduce", async_op)

    monkeypatch.setattr(sharded, "dist_info", lambda: (rank, WORLD))
    for module in ("optimizers.adam", "optimizers.spectral_echo", "optimizers.spectral_ord"):
        monkeypatch.setattr(f"{module}.dist_info", lambda: (rank, WORLD))
    monkeypatch.setattr(dist, "reduce_scatter_tensor", reduce_scatter)
    monkeypatch.setattr(dist, "all_gather_into_tensor", all_gather)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return started


def build(name: str, params):
    matrices = [p for p in params if p.ndim >= 2]
    if name == "muon":
        return Muon(matrices, lr=0.02)
    if name == "spectral_ord":
        return SpectralORD(matrices, lr=0.02, spectral_lr_mul=0.5)
    if name == "spectral_echo":  # step 0: a fit step (2 ranks x 2 micro-batches = 4 replicates); step 1: ordinary
        return SpectralEcho(matrices, lr=0.02, fit_every=2, n_bins=8, bin_min=1e-2)
    if name in ("spectral_echo_plateau", "spectral_echo_reverb"):  # fit step 0 sends norms / every replicate
        mode = "plateau" if name.endswith("plateau") else "reverb_svd"
        return SpectralEcho(matrices, lr=0.02, fit_every=2, mode=mode)
    if name == "normuon":
        return NorMuon(matrices, lr=0.02)
    if name == "adam":
        return DistAdam(params, lr=0.01)  # (8, 12) rows are reduce-scattered, (5, 5) and (6,) all-reduced
    return AdamWMatrix(matrices, lr=0.01)


def feed(opt, params, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = None
    for _ in range(2):  # two micro-batches (SpectralEcho records each one as a replicate on a fit step)
        for p in params:
            g = torch.randn(p.shape, generator=gen)
            p.grad = g if p.grad is None else p.grad + g
        if hasattr(opt, "add_replicate_gradients"):
            opt.add_replicate_gradients()


def failing(*args, **kwargs):
    raise FloatingPointError("injected failure in the first update")


OPTIMIZER_NAMES = ["muon", "normuon", "spectral_ord", "spectral_echo", "spectral_echo_plateau", "spectral_echo_reverb",
                   "adam", "adamw"]


@pytest.mark.parametrize("two_fake_ranks", [0, 1], indirect=True, ids=["rank0", "rank1"])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_step_waits_for_every_collective_it_starts(two_fake_ranks, name):
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    opt = build(name, params)
    for step in range(2):
        feed(opt, params, step)
        if name.startswith("spectral_echo"):
            assert opt.replicates_wanted() == (step == 0)  # a fit step, then an ordinary one
        opt.step()
        assert two_fake_ranks, "no collective started: the world-size-2 path was not taken"
        assert [w.name for w in two_fake_ranks if not w.waited] == []


@pytest.mark.parametrize("two_fake_ranks", [0, 1], indirect=True, ids=["rank0", "rank1"])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_failed_step_waits_for_its_collectives_before_raising(two_fake_ranks, name):
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    opt = build(name, params)
    setattr(opt, "_update" if isinstance(opt, DistAdam) else "compute_update", failing)
    feed(opt, params)
    with pytest.raises(FloatingPointError, match="injected"):
        opt.step()
    # every reduction is started before the first update, so all of them were in flight when it failed
    assert len(two_fake_ranks) >= 4
    assert [w.name for w in two_fake_ranks if not w.waited] == []


def test_wait_for_all_keeps_the_original_error_and_notes_a_failed_wait():
    works = [RecordedWork("a"), None, RecordedWork("b", fail=True), RecordedWork("c")]
    error = FloatingPointError("original")
    wait_for_all(works, error)
    assert all(w.waited for w in works if w is not None)
    notes = getattr(error, "__notes__", [])
    assert len(notes) == 1 and "b: connection closed by peer" in notes[0]


def test_close_process_group_joins_gloo_threads():
    """A real gloo group (one rank, in this process): an async collective on a temporary tensor, an optimizer
    built after the group exists (it imports torch.distributed.nn through torch._dynamo), then the teardown."""
    assert not dist.is_initialized()
    start_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert gloo_threads(), "a gloo group runs worker threads (else this check proves nothing)"
        dist.all_reduce(torch.ones(1000) * 3, async_op=True).wait()  # the gloo thread frees the temporary
        params = [torch.nn.Parameter(torch.randn(8, 12))]
        opt = Muon(params, lr=0.02)
        feed(opt, params)
        opt.step()
        assert close_process_group() == []
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_close_process_group_without_a_group_is_a_no_op():
    assert not dist.is_initialized()
    assert close_process_group() == []
