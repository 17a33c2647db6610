"""vr_mcmc.sample on torch.distributed (issue 21): real 2-process gloo runs on 127.0.0.1, each rank a process
forked from the test's with the environment torchrun gives (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) running tests/dist_job.py's main, every launch under a timeout (a hang fails the test, it never blocks
the suite). References: the same job in this
process, one process, no torch.distributed."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import dist_job

import vr_mcmc
from vr_mcmc.chains.blocks import verify_blocks
from vr_mcmc.distributed import chain_share, shard_range
from vr_mcmc.distributed.group import check_backend


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(argv: list[str], env: dict[str, str], log: str) -> None:
    """One rank in a forked child: the environment torchrun would give it, its output to ``log``."""
    import torch._dynamo  # noqa: F401  (already imported by the parent: forked, not re-imported)

    os.environ.update(env)
    with open(log, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        sys.stdout = sys.stderr = open(1, "w", closefd=False)  # noqa: SIM115
        dist_job.main(argv)
        sys.stdout.flush()


class Rank:
    """A rank's process (forked from this one, which has torch and the job imported: a child starts in
    milliseconds instead of the ~10 s of imports of a fresh interpreter on this busy machine) and its output."""

    def __init__(self, process, log: str):
        self.process, self.log = process, log

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()

    def send_signal(self, sig: int) -> None:
        os.kill(self.process.pid, sig)

    def output(self) -> str:
        return Path(self.log).read_text() if Path(self.log).exists() else ""


def launch(*args: str, world: int = 2, env: dict | None = None) -> list[Rank]:
    import multiprocessing

    import torch._dynamo  # noqa: F401  (what building a torch.optim optimizer imports: once, here, not per rank)

    port = _free_port()
    ctx = multiprocessing.get_context("fork")
    ranks = []
    for rank in range(world):
        e = dict(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port), **(env or {}))
        log = os.path.join(args[4] + f".rank{rank}.log") if len(args) > 4 else os.devnull
        process = ctx.Process(target=_rank, args=(list(args), e, log), daemon=True)
        process.start()
        ranks.append(Rank(process, log))
    return ranks


def finish(ranks: list[Rank], timeout: float = 90) -> list[tuple[int, str]]:
    """Each rank's (exit code, output); kills them all and fails if any is still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    for r in ranks:
        r.process.join(max(0.1, deadline - time.monotonic()))
    if any(r.process.exitcode is None for r in ranks):
        for r in ranks:
            r.kill()
        pytest.fail(f"a rank hung (no exit within {timeout} s): " + "\n".join(r.output() for r in ranks))
    return [(r.process.exitcode, r.output()) for r in ranks]


def run_ok(*args: str, timeout: float = 90, **kw) -> None:
    results = finish(launch(*args, **kw), timeout)
    for rank, (code, text) in enumerate(results):
        assert code == 0, f"rank {rank} exited with {code}:\n{text}"


def one_process(sampler: str, num_samples: int, num_chains: int) -> dict[str, np.ndarray]:
    torch.set_num_threads(1)
    return dist_job.arrays(dist_job.run("chains", sampler, None, num_samples, num_chains=num_chains))


# -- chains across ranks -----------------------------------------------------------------------------------
def test_kept_parameters_across_ranks_are_one_processs_ensemble(tmp_path):
    """keep_params under chains across ranks (a checkpoint directory both ranks see): every rank writes its chains'
    parameter files, rank 0 the index; the ensemble equals a one-process run's, file for file. Data parallel with
    keep_params is refused on both ranks before any draw."""
    run_ok("chains", "sgld", str(tmp_path / "run"), "60", str(tmp_path / "out"), "--chains", "3", "--keep", "10")
    torch.set_num_threads(1)
    dist_job.run("chains", "sgld", str(tmp_path / "one"), 60, num_chains=3, keep_params=10)
    ranks = vr_mcmc.PosteriorEnsemble(tmp_path / "run" / "sgld", dist_job.model_fn())
    one = vr_mcmc.PosteriorEnsemble(tmp_path / "one", dist_job.model_fn())
    assert len(ranks) == len(one) == 3 * 6 and ranks.draw_indices == one.draw_indices
    for i in range(len(one)):
        for name, value in one[i].items():
            assert torch.equal(value, ranks[i][name]), (i, name)
    results = finish(launch("data", "sgld", str(tmp_path / "dp"), "20", str(tmp_path / "dpout"), "--chains", "1",
                            "--keep", "5"), 60)
    for code, text in results:
        assert code == 2 and "keep_params is not supported with data_parallel=True" in text, text
    assert not (tmp_path / "dp" / "sgld" / "params").exists()




@pytest.mark.parametrize("checkpoint", [True, False], ids=["checkpoint", "in-memory"])
def test_chains_across_ranks_give_the_draws_of_one_process(tmp_path, checkpoint):
    """3 chains on 2 ranks (2 + 1): the merged result equals one process's, bit for bit. In memory each rank has its
    own temporary directory, so rank 1's draw files travel to rank 0; with a checkpoint they are merged in place."""
    directory = str(tmp_path / "run") if checkpoint else "-"
    run_ok("chains", "sgld", directory, "60", str(tmp_path / "out"), "--chains", "3")
    got = dict(np.load(tmp_path / "out-sgld.npz"))
    ref = one_process("sgld", 60, 3)
    assert set(got) == set(ref)
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    if checkpoint:
        files = sorted(p.name for p in (tmp_path / "run" / "sgld").iterdir())
        assert files == ["chain_0.pt", "chain_1.pt", "chain_2.pt", "manifest.json", "results.nc"], files


# -- one chain across ranks --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_parallel_run(tmp_path_factory):
    """SAGA-LD and SVRG-LD, one chain of 200 steps on 2 ranks, checkpointed every 20 draws."""
    base = tmp_path_factory.mktemp("dp")
    run_ok("data", "sagald,svrgld", str(base / "run"), "200", str(base / "out"), "--chains", "1", timeout=120)
    return base


@pytest.mark.parametrize("sampler", ["sagald", "svrgld"])
def test_data_parallel_chain_equals_the_one_process_chain(data_parallel_run, sampler):
    """After 200 steps in float64 the draws differ from one process's by the order of the sums only: ≤ 1e-12
    (measured 4e-15); a wrong scale, a missed shard or different noise would differ at 1e-3 or more."""
    got = dict(np.load(data_parallel_run / f"out-{sampler}.npz"))
    ref = one_process(sampler, 200, 1)
    for name in ("posterior/weight", "posterior/bias", "sample_stats/lp"):
        assert got[name].shape == ref[name].shape == (1, 200, *ref[name].shape[2:])
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-12, atol=1e-12, err_msg=name)
    np.testing.assert_array_equal(got["sample_stats/grad_evals"], ref["sample_stats/grad_evals"])
    assert np.isnan(got["sample_stats/noise_ratio"]).all()  # needs the whole batch's per-example gradients


def test_ranks_holding_only_their_rows_of_the_data_make_the_same_chain(data_parallel_run, tmp_path):
    """Each rank passes a Shard (a copy of its 60 rows only): the draws are those of the ranks given all the data."""
    run_ok("data", "sagald", "-", "200", str(tmp_path / "out"), "--chains", "1", "--shard")
    got, ref = np.load(tmp_path / "out-sagald.npz"), np.load(data_parallel_run / "out-sagald.npz")
    for name in ("posterior/weight", "posterior/bias", "sample_stats/lp"):
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)


def test_a_shard_of_other_rows_is_refused(tmp_path):
    """Rank r must hold shard_range(N, K, r): a Shard of rank 0's rows given to rank 1 is refused before sampling."""
    from vr_mcmc.distributed import Shard

    with pytest.raises(IndexError, match=r"holds examples 0\.\.59 of 120 only"):
        Shard((dist_job.X[:60], dist_job.Y[:60]), 120, 0).fetch(torch.tensor([3, 70]))
    results = finish(launch("data", "sagald", "-", "20", str(tmp_path / "out"), "--shard", "--bad", "shard"), 60)
    assert "ERROR ValueError rank 1 was given a Shard of examples 0..59 but holds 60..119" in results[1][1], results


def test_each_rank_table_holds_only_its_rows(data_parallel_run, tmp_path):
    """Rank r's SAGA table holds the rows of its 60 examples (shard_range), half the one-process table's bytes."""
    torch.set_num_threads(1)
    dist_job.run("chains", "sagald", str(tmp_path / "one"), 20, num_chains=1)
    whole = torch.load(tmp_path / "one" / "chain_0.pt", weights_only=False)["sampler"]["estimator"]["table"]
    total = sum(t.nbytes for rows in whole["rows"].values() for t in rows)
    assert whole["config"]["num_data"] == dist_job.N
    for rank in range(2):
        state = torch.load(data_parallel_run / "run" / "sagald" / f"chain_0.rank{rank}.pt", weights_only=False)
        table = state["sampler"]["estimator"]["table"]
        assert table["config"]["num_data"] == len(shard_range(dist_job.N, 2, rank)) == 60
        mine = sum(t.nbytes for rows in table["rows"].values() for t in rows)
        assert mine == total // 2, (mine, total)
        assert all(t.shape[0] == 60 for rows in table["rows"].values() for t in rows)


def test_data_parallel_sg_family_and_hmc_equal_one_process(tmp_path):
    """SGLD, SGHMC, pSGLD, SGNHT (minibatch gradients all-reduced) and HMC (the full-data closure all-reduced)."""
    samplers = ["sgld", "sghmc", "psgld", "sgnht", "hmc"]
    run_ok("data", ",".join(samplers), "-", "40", str(tmp_path / "out"), "--chains", "1", timeout=120)
    for sampler in samplers:
        got = dict(np.load(tmp_path / f"out-{sampler}.npz"))
        ref = one_process(sampler, 40, 1)
        for name in ("posterior/weight", "posterior/bias"):
            np.testing.assert_allclose(got[name], ref[name], rtol=1e-12, atol=1e-12, err_msg=f"{sampler} {name}")


# -- faults --------------------------------------------------------------------------------------------------


def _wait_for(path: Path, ranks: list[Rank], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or any(r.poll() is not None for r in ranks):
            for r in ranks:
                r.kill()
            pytest.fail(f"{path.name} never appeared: " + "".join(r.output() for r in ranks))
        time.sleep(0.02)


def test_a_rank_killed_mid_chain_stops_the_other_and_the_rerun_resumes(data_parallel_run, tmp_path):
    """Data parallel: SIGKILL rank 1 after its first checkpoint; rank 0 stops at its next all-reduce with a
    DistributedError (no hang), every checkpoint loads, rank 0's draw blocks verify, and the same command resumes to
    the uninterrupted run's draws, bit for bit."""
    args = ("data", "sagald", str(tmp_path / "run"), "200", str(tmp_path / "out"), "--chains", "1")
    procs = launch(*args)
    _wait_for(tmp_path / "run" / "sagald" / "chain_0.rank1.pt", procs)
    procs[1].send_signal(signal.SIGKILL)
    (code0, out0), (code1, _) = finish(procs, timeout=60)
    assert code1 == -signal.SIGKILL
    assert code0 == 2 and "ERROR DistributedError rank 0:" in out0 and "run the same command again" in out0, out0
    partial = re.search(r"PARTIAL draws (\d+)", out0)  # exc.partial: the draws rank 0 made before the error
    assert partial and 20 <= int(partial.group(1)) < 200, out0
    directory = tmp_path / "run" / "sagald"
    for path in directory.glob("chain_0.rank*.pt"):
        state = torch.load(path, weights_only=False)
        assert 0 < state["step"] < 200
    verify_blocks(directory, 0, torch.load(directory / "chain_0.rank0.pt", weights_only=False)["index"])
    run_ok(*args)
    got, ref = np.load(tmp_path / "out-sagald.npz"), np.load(data_parallel_run / "out-sagald.npz")
    for name in ("posterior/weight", "posterior/bias", "sample_stats/lp"):
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)


def test_a_stopped_rank_is_a_timeout_of_the_users_group_not_a_hang(data_parallel_run, tmp_path):
    """The job initializes its own gloo group with a 3 s timeout (sample uses it); rank 1 is frozen (SIGSTOP) after
    its first checkpoint, so its connections stay open: rank 0's all-reduce times out and it stops with a
    DistributedError; rank 1 is then killed, and the rerun resumes to the uninterrupted draws."""
    args = ("data", "sagald", str(tmp_path / "run"), "200", str(tmp_path / "out"), "--chains", "1")
    ranks = launch(*args, "--timeout", "3")
    _wait_for(tmp_path / "run" / "sagald" / "chain_0.rank1.pt", ranks)
    ranks[1].send_signal(signal.SIGSTOP)
    start = time.monotonic()
    ranks[0].process.join(60)
    waited = time.monotonic() - start
    ranks[1].send_signal(signal.SIGKILL)
    (code0, out0), _ = finish(ranks, timeout=30)
    assert code0 == 2 and "ERROR DistributedError rank 0:" in out0, out0
    assert 2.5 < waited < 30, waited  # the group's timeout, not forever
    run_ok(*args)
    got, ref = np.load(tmp_path / "out-sagald.npz"), np.load(data_parallel_run / "out-sagald.npz")
    np.testing.assert_array_equal(got["posterior/weight"], ref["posterior/weight"])


def test_a_rank_killed_while_others_wait_is_named_and_the_rerun_resumes(tmp_path):
    """Chains across ranks: rank 1 is killed in its chain; rank 0 finishes chain 0, waits, sees rank 1's heartbeat
    stop (VR_MCMC_STALL_SECONDS=3) and stops naming it; the rerun resumes chain 1 and gives one process's draws."""
    args = ("chains", "sgld", str(tmp_path / "run"), "400", str(tmp_path / "out"), "--chains", "2")
    procs = launch(*args, env={"VR_MCMC_STALL_SECONDS": "3"})
    _wait_for(tmp_path / "run" / "sgld" / "chain_1.pt", procs)
    procs[1].send_signal(signal.SIGKILL)
    (code0, out0), (code1, _) = finish(procs, timeout=90)
    assert code1 == -signal.SIGKILL
    assert code0 == 2 and "ERROR DistributedError" in out0 and "rank 1 stopped before finishing" in out0, out0
    assert torch.load(tmp_path / "run" / "sgld" / "chain_1.pt", weights_only=False)["step"] < 400
    run_ok(*args)
    got, ref = dict(np.load(tmp_path / "out-sgld.npz")), one_process("sgld", 400, 2)
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)


# -- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, named", [("seed", "seed: rank 0 3, rank 1 4"), ("data", "data[0]")])
def test_ranks_given_different_arguments_are_refused_before_sampling(tmp_path, bad, named):
    results = finish(launch("chains", "sgld", str(tmp_path / "run"), "40", str(tmp_path / "out"), "--bad", bad), 60)
    for code, out in results:
        assert code == 2 and "ERROR ValueError the ranks called vr_mcmc.sample with different arguments" in out, out
        assert named in out, out
    assert not (tmp_path / "run").exists()  # refused before the directory was made


@pytest.mark.parametrize("mode, sampler, option, message", [
    ("chains", "sgld", "parallel", "ValueError chain_method='parallel' under torch.distributed"),
    ("data", "sagald_blocks", "sequential", "ValueError data_parallel=True does not support a partitioned"),
    ("data", "sghmc_auto", "sequential", "ValueError data_parallel=True does not support SGHMC(beta='auto')"),
])
def test_what_cannot_run_across_ranks_is_refused_on_every_rank(tmp_path, mode, sampler, option, message):
    results = finish(launch(mode, sampler, "-", "20", str(tmp_path / "out"), "--chain-method", option), 60)
    for code, out in results:
        assert code == 2 and f"ERROR {message}" in out, out


def test_nccl_on_cpu_tensors_is_refused():
    check_backend("cpu:gloo,cuda:nccl", torch.device("cpu"))
    check_backend("nccl", torch.device("cuda", 0))
    with pytest.raises(ValueError, match="NCCL, which moves CUDA tensors only, but the model's parameters are on cpu"):
        check_backend("nccl", torch.device("cpu"))


def test_shares_of_chains_and_examples_are_contiguous_and_uneven_where_they_must_be():
    assert [chain_share(3, 2, r) for r in range(2)] == [[0, 1], [2]]
    assert [chain_share(2, 3, r) for r in range(3)] == [[0], [1], []]
    assert [shard_range(7, 3, r) for r in range(3)] == [range(0, 3), range(3, 5), range(5, 7)]


def test_process_group_false_runs_each_rank_on_its_own(tmp_path):
    """Under the launcher's environment, process_group=False: each rank samples alone (different seeds allowed)."""
    ranks = launch("chains", "sgld", "-", "20", str(tmp_path / "out"), "--chains", "1", "--bad", "seed",
                   "--own")
    for code, out in finish(ranks, 60):
        assert code == 0 and "sgld done: result" in out, out


def test_data_parallel_without_a_process_group_is_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"data_parallel=True runs one chain across the ranks of torch\.distributed"):
        dist_job.run("data", "sgld", None, 10)
