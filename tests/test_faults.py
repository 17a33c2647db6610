"""Fault injection (issue 14): each test reproduces a fault with the real thing (a SIGKILL, a damaged
file, a full file system, a bad input) and checks that it is detected, explained, and loses no draw."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import chain_job
import numpy as np
import pytest
import torch

import torch_sample
import vr_mcmc

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # conftest.py
    yield


# -- 10. seeds -------------------------------------------------------------------------------------


def test_runs_with_neighbouring_seeds_share_no_chain():
    """With seed + chain, seed=4 chain 0 was seed=3 chain 1, bit for bit."""
    a = chain_job.run(None, "sgld", num_samples=10, num_warmup=0, seed=3)
    b = chain_job.run(None, "sgld", num_samples=10, num_warmup=0, seed=4)
    for c in range(1, 2):
        assert not np.array_equal(a.posterior["weight"].values[c], b.posterior["weight"].values[c - 1])
    assert not np.array_equal(a.posterior["weight"].values[0], a.posterior["weight"].values[1])
    seeds = {vr_mcmc.chains.chain_seeds(s, c) for s in range(20) for c in range(8)}
    assert len(seeds) == 160


# -- 1. SG samplers: non-finite steps are skipped, counted, and stop the chain with a clear error --------


def _linear_problem(nan_row: int | None = None):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 3, generator=gen), torch.randn(64, generator=gen)
    if nan_row is not None:
        x[nan_row, 1] = float("nan")
    return x, y


def test_sgld_skips_a_nan_batch_and_names_the_data_after_k_in_a_row():
    x, y = _linear_problem(nan_row=5)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    sampler = torch_sample.SGLD(model.parameters(), lr=1e-3, num_data=64, max_divergences=3)
    seen = {"diverging": 0, "moved": 0}
    for start in range(0, 64, 8):  # 8 batches, one of them holds the NaN example
        idx = torch.arange(start, start + 8)
        before = [p.detach().clone() for p in model.parameters()]
        sampler.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[idx]).squeeze(-1), y[idx])
        loss.backward()
        sampler.step(indices=idx, loss=loss.detach())
        same = all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert sampler.stats["diverging"] == (start == 0) == same  # the step was undone exactly there
        seen["diverging" if same else "moved"] += 1
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert seen == {"diverging": 1, "moved": 7}
    idx = torch.arange(0, 8)
    with pytest.raises(torch_sample.DivergenceError, match=r"3 steps in a row.*non-finite data.*step size too large"):
        for _ in range(3):
            sampler.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[idx]).squeeze(-1), y[idx])
            loss.backward()
            sampler.step(indices=idx, loss=loss.detach())


def test_exploding_step_size_is_stopped_with_the_growth_of_the_gradient():
    x, y = _linear_problem()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    sampler = torch_sample.SGLD(model.parameters(), lr=5.0, num_data=64, temperature=0.0)
    with pytest.raises(torch_sample.DivergenceError, match=r"20 steps in a row.*norm went from .* to .*lr=5"):
        for _ in range(2000):
            sampler.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x).squeeze(-1), y)
            loss.backward()
            sampler.step(loss=loss.detach())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the last finite state


class _FailAt:
    """A loss_fn that turns bad at its ``at``-th call (NaN, or an exception): U = NaN, or a crash mid-run."""

    def __init__(self, at: int, fault: str):
        self.calls, self.at, self.fault = 0, at, fault

    def __call__(self, model, batch):
        self.calls += 1
        loss = chain_job.loss_fn(model, batch)
        if self.calls >= self.at:
            if self.fault == "raise":
                raise ValueError("injected fault")
            return loss * float("nan")
        return loss


def _sgld_k5(model):
    sampler = chain_job.sgld(model)
    sampler.max_divergences = 5
    return sampler


def test_sample_stops_a_diverging_chain_and_keeps_every_draw_before_it():
    options = dict(batch_size=20, num_chains=2, num_warmup=10, num_samples=60, seed=3, progress=False,
                   checkpoint_every=7)
    clean = vr_mcmc.sample(chain_job.model_fn, _sgld_k5, chain_job.loss_fn, (chain_job.X, chain_job.Y), **options)
    with pytest.raises(torch_sample.DivergenceError, match="5 steps in a row") as info:
        vr_mcmc.sample(chain_job.model_fn, _sgld_k5, _FailAt(41, "nan"), (chain_job.X, chain_job.Y), **options)
    partial = info.value.partial
    # steps 41..44 diverged (kept, flagged), step 45 raised: draws 1..34 after the 10 warmup steps
    assert list(partial.posterior.chain.values) == [0] and partial.posterior.sizes["draw"] == 34
    diverging = partial.sample_stats["diverging"].values[0]
    assert not diverging[:30].any() and diverging[30:].all()
    np.testing.assert_array_equal(partial.posterior["weight"].values[0, :30], clean.posterior["weight"].values[0, :30])
    np.testing.assert_array_equal(partial.posterior["weight"].values[0, 30:],  # frozen at the last finite draw
                                  np.repeat(partial.posterior["weight"].values[0, 29:30], 4, axis=0))
    assert info.value.checkpoint is None


# -- 3. a run without checkpoint= that raises keeps its draws --------------------------------------


def test_an_exception_mid_run_carries_the_draws_made_before_it():
    options = dict(batch_size=20, num_chains=2, num_warmup=10, num_samples=40, seed=3, progress=False,
                   checkpoint_every=15)
    clean = vr_mcmc.sample(chain_job.model_fn, chain_job.sgld, chain_job.loss_fn, (chain_job.X, chain_job.Y),
                           **options)
    with pytest.raises(ValueError, match="injected fault") as info:  # chain 1, its 23rd step
        vr_mcmc.sample(chain_job.model_fn, chain_job.sgld, _FailAt(50 + 23, "raise"), (chain_job.X, chain_job.Y),
                       **options)
    partial = info.value.partial
    weight = partial.posterior["weight"].values
    assert weight.shape[:2] == (2, 40)
    np.testing.assert_array_equal(weight[0], clean.posterior["weight"].values[0])
    np.testing.assert_array_equal(weight[1, :12], clean.posterior["weight"].values[1, :12])
    assert np.isnan(weight[1, 12:]).all()  # chain 1 is shorter: padded, not cut, not invented


# -- 2. MALA/HMC refuse half precision; 9. bad inputs are refused before sampling ---------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_samplers_refuse_half_precision(dtype):
    model = torch.nn.Linear(3, 1).to(dtype)
    for make in (lambda p: torch_sample.HMC(p, lr=0.1, num_data=10), lambda p: torch_sample.MALA(p, lr=0.1)):
        with pytest.raises(TypeError, match=f"float32 or float64 parameters, got {dtype}"):
            make(model.parameters())


def _mlp2():
    return torch.nn.Sequential(torch.nn.Linear(chain_job.D, 2), torch.nn.Linear(2, 1))


_calls = {"n": 0}


def _model_by_chain():  # chain 1 gets a wider model: a different architecture
    _calls["n"] += 1
    return torch.nn.Linear(chain_job.D, 1) if _calls["n"] % 2 else torch.nn.Sequential(torch.nn.Linear(chain_job.D, 1))


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(sampler_fn=lambda m: torch_sample.SGLD(m.parameters(), lr=1e-3, num_data=500)), ValueError,
         "num_data=500 but the data has 120 examples"),
        (dict(sampler_fn=lambda m: torch_sample.HMC(m.parameters(), lr=0.1)), ValueError,
         "num_data=1 but the data has 120.*full-data closure|num_data=1 but the data has 120"),
        (dict(sampler_fn=lambda m: torch.optim.SGD(m.parameters(), lr=0.1)), TypeError,
         "torch.optim.sgd.SGD, which vr_mcmc.sample cannot drive: it supports SG samplers"),
        (dict(log_likelihood=lambda m: chain_job.log_likelihood(m)[:100]), ValueError,
         "returned 100 values but observed_data has 120"),
        (dict(log_likelihood=lambda m: chain_job.log_likelihood(m).sum()), ValueError, "returned a scalar"),
        (dict(record={"name": lambda m: "a string"}), TypeError, "'name' is not numeric"),
        (dict(record={"ragged": lambda m: [[1.0, 2.0], [3.0]]}), TypeError, "'ragged' is not a rectangular"),
        (dict(record=["weight", "nope"]), ValueError, r"\['nope'\] are not parameters"),
        (dict(model_fn=_model_by_chain), ValueError, "different model for chain 1"),
    ],
)
def test_bad_inputs_are_refused_before_sampling(change, error, match, monkeypatch):
    monkeypatch.setattr(torch_sample.SGLD, "step", lambda *a, **k: pytest.fail("sampling started"))
    monkeypatch.setattr(torch_sample.HMC, "step", lambda *a, **k: pytest.fail("sampling started"))
    _calls["n"] = 0
    args = dict(model_fn=chain_job.model_fn, sampler_fn=chain_job.sgld, loss_fn=chain_job.loss_fn,
                data=(chain_job.X, chain_job.Y))
    options = dict(batch_size=20, num_chains=2, num_warmup=5, num_samples=5, progress=False,
                   log_likelihood=chain_job.log_likelihood, observed_data={"y": chain_job.Y})
    for key in list(change):
        (args if key in args else options)[key] = change[key]
    with pytest.raises(error, match=match):
        vr_mcmc.sample(**args, **options)


def test_mala_target_accept_zero_and_a_shape_changing_record():
    with pytest.raises(ValueError, match="target_accept must be a number strictly between 0 and 1, got 0"):
        torch_sample.MALA(torch.nn.Linear(2, 1).parameters(), lr=0.1, target_accept=0)
    grow = {"k": 0}

    def changing(model):
        grow["k"] += 1
        return torch.zeros(grow["k"])

    with pytest.raises(ValueError, match=r"recorded as 'changing' returned shape \(3,\) at this draw but \(2,\)"):
        chain_job.run(None, "sgld", num_samples=5, num_warmup=0, record={"changing": changing})


# -- 4. damaged checkpoints; 7. changed options ---------------------------------------------------------


def _unmerged(directory, monkeypatch, **kw):
    """A run that died just before its merge: every block and checkpoint on disk, no results.nc."""
    with monkeypatch.context() as m:
        m.setattr("vr_mcmc.chains.sampling._finish", lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            chain_job.run(directory, "sgld", num_samples=60, **kw)


@pytest.mark.parametrize("damage", ["delete", "truncate", "corrupt"])
def test_a_damaged_block_is_refused_not_skipped(tmp_path, monkeypatch, damage):
    directory = tmp_path / "run"
    _unmerged(directory, monkeypatch)
    block = directory / "chain_1.000001.nc"
    data = block.read_bytes()
    if damage == "delete":
        block.unlink()
    elif damage == "truncate":
        block.write_bytes(data[: len(data) // 2])
    else:
        block.write_bytes(data[:-100] + bytes(b ^ 0xFF for b in data[-100:]))
    with pytest.raises(vr_mcmc.CheckpointError, match=r"chain_1\.000001\.nc (is missing|has \d+ bytes|does not match)"
                       r".*delete chain_1\.pt and chain_1\.\*\.nc"):
        chain_job.run(directory, "sgld", num_samples=60)
    assert not (directory / "results.nc").exists()


def test_blocks_are_kept_until_the_merged_file_is_verified(tmp_path, monkeypatch):
    directory = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr("vr_mcmc.chains.blocks._check_merged", lambda *a: (_ for _ in ()).throw(vr_mcmc.CheckpointError("x")))
        with pytest.raises(vr_mcmc.CheckpointError):
            chain_job.run(directory, "sgld", num_samples=60)
    assert len(list(directory.glob("chain_*.nc"))) == 6 and not (directory / "results.nc").exists()
    resumed = chain_job.run(directory, "sgld", num_samples=60)
    np.testing.assert_array_equal(resumed.posterior["weight"].values,
                                  chain_job.run(None, "sgld", num_samples=60).posterior["weight"].values)


@pytest.mark.parametrize("damage", ["delete", "truncate", "foreign"])
def test_a_damaged_or_foreign_results_file_is_refused(tmp_path, damage):
    directory = tmp_path / "run"
    chain_job.run(directory, "sgld", num_samples=30)
    results = directory / "results.nc"
    if damage == "delete":
        results.unlink()
    elif damage == "truncate":
        results.write_bytes(results.read_bytes()[:-1000])
    else:
        other = tmp_path / "other"
        chain_job.run(other, "sgld", num_samples=30, seed=4)
        results.write_bytes((other / "results.nc").read_bytes())
    with pytest.raises(vr_mcmc.CheckpointError, match=r"results\.nc (is missing|has \d+ bytes|does not match)"
                       r".*restore that file"):
        chain_job.run(directory, "sgld", num_samples=30)


def test_changed_sampler_options_or_data_are_refused_listing_the_change(tmp_path):
    directory = tmp_path / "run"
    options = dict(batch_size=20, num_chains=1, num_warmup=0, num_samples=10, progress=False, checkpoint=directory)
    data = (chain_job.X, chain_job.Y)
    vr_mcmc.sample(chain_job.model_fn, chain_job.sgld, chain_job.loss_fn, data, **options)

    def faster(model):
        return torch_sample.SGLD(model.parameters(), lr=4e-3, num_data=chain_job.N,
                                 prior=torch_sample.priors.Normal(2.0))

    with pytest.raises(vr_mcmc.CheckpointError, match=r"holds another run \(sampler\.defaults\.lr: saved 0\.002, "
                       r"asked 0\.004, sampler\.param_groups\[0\]\.lr: saved 0\.002, asked 0\.004\)"):
        vr_mcmc.sample(chain_job.model_fn, faster, chain_job.loss_fn, data, **options)
    with pytest.raises(vr_mcmc.CheckpointError, match=r"data\[0\]: saved \[120, 3, 'torch.float32'\], asked \[120, 2"):
        vr_mcmc.sample(lambda: torch.nn.Linear(2, 1), chain_job.sgld, chain_job.loss_fn,
                       (chain_job.X[:, :2], chain_job.Y), **options)


# -- 5. a full disk; 6. a crash in the manifest's rename window; 8. parallel workers -----------------


def _python(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def test_disk_full_during_a_checkpoint_is_a_clear_error_and_the_run_resumes(tmp_path, monkeypatch):
    """ENOSPC injected at the file-system boundary (torch.save's write) at the 4th checkpoint."""
    import errno

    directory = tmp_path / "run"
    real_save, calls = torch.save, {"n": 0}

    def save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            Path(f).write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr("vr_mcmc.chains.checkpoint.torch.save", save)
    with pytest.raises(vr_mcmc.chains.checkpoint.DiskFullError, match=f"no space left to write the checkpoint "
                       rf"chain_0\.pt in {directory}: .* MiB free, about .* MiB needed.*call again") as info:
        chain_job.run(directory, "sgld", num_samples=150)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert not list(directory.glob("*.tmp"))
    monkeypatch.setattr("vr_mcmc.chains.checkpoint.torch.save", real_save)
    resumed = chain_job.run(directory, "sgld", num_samples=150)
    np.testing.assert_array_equal(resumed.posterior["weight"].values,
                                  chain_job.run(None, "sgld", num_samples=150).posterior["weight"].values)


FULL_DISK_JOB = """
import shutil, sys, chain_job, vr_mcmc
try:
    chain_job.run(sys.argv[1], "sgld", num_samples=400, record={"w": lambda m: m.weight})
except vr_mcmc.CheckpointError as exc:
    print("ERROR", type(exc).__name__, exc)
shutil.copytree(sys.argv[1], sys.argv[2])  # the tmpfs vanishes with this namespace
"""


def test_a_real_full_tmpfs_gives_a_clear_error_and_resumable_blocks(tmp_path):
    """A 160 KiB tmpfs in a user+mount namespace (unshare -rm: no root needed where user namespaces are on)."""
    mount, kept = tmp_path / "small", tmp_path / "kept"
    mount.mkdir()
    script = tmp_path / "job.py"
    script.write_text(FULL_DISK_JOB)
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=160k tmpfs {mount}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")
    run = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=160k tmpfs {mount} && "
                          f"{sys.executable} {script} {mount / 'run'} {kept}"], env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]  # no SIGSEGV, no traceback out of the job
    assert "ERROR DiskFullError [Errno 28] no space left to write" in run.stdout and str(mount / "run") in run.stdout
    resumed = chain_job.run(kept, "sgld", num_samples=400, record={"w": lambda m: m.weight})
    clean = chain_job.run(None, "sgld", num_samples=400, record={"w": lambda m: m.weight})
    np.testing.assert_array_equal(resumed.posterior["w"].values, clean.posterior["w"].values)


def test_a_kill_between_the_manifests_write_and_rename_is_resumable(tmp_path):
    directory = tmp_path / "run"
    code = f"""
import os, signal, chain_job, vr_mcmc.chains.checkpoint as ck
real = os.replace
def replace(src, dst):
    if str(dst).endswith("manifest.json"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
ck.os.replace = replace
chain_job.run({str(directory)!r}, "sgld", num_samples=30)
"""
    proc = _python(code)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL and [p.name for p in directory.iterdir()] == ["manifest.tmp"]
    resumed = chain_job.run(directory, "sgld", num_samples=30)
    np.testing.assert_array_equal(resumed.posterior["weight"].values,
                                  chain_job.run(None, "sgld", num_samples=30).posterior["weight"].values)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _workers(proc: subprocess.Popen, directory: Path, timeout: float = 90) -> list[int]:
    """The chain workers of ``proc`` once both chains have written a block."""
    deadline = time.monotonic() + timeout
    while not (list(directory.glob("chain_0.*.nc")) and list(directory.glob("chain_1.*.nc"))):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)
    return [p for p in _children(proc.pid) if "resource_tracker" not in Path(f"/proc/{p}/cmdline").read_text()]


PARALLEL_JOB = """
import sys, chain_job
try:
    chain_job.run(sys.argv[1], "sgld", num_samples=20000, chain_method="parallel", checkpoint_every=10)
except Exception as exc:
    print("ERROR", type(exc).__name__, exc, "| partial chains", exc.partial.posterior.chain.values.tolist())
"""


def test_a_killed_worker_fails_the_run_without_a_hang(tmp_path):
    directory = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", PARALLEL_JOB, str(directory)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        workers = _workers(proc, directory)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)  # as the OOM killer does
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "ERROR WorkerError the worker process of chain" in out and "killed by signal SIGKILL" in out, out + err
    assert "partial chains [0, 1]" in out  # both chains' draws so far are kept
    assert not any(_alive(w) for w in workers)


@pytest.mark.slow  # 8-14 s of subprocesses: the default suite keeps the killed-worker test
def test_workers_stop_when_the_parent_is_killed(tmp_path):
    directory = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", PARALLEL_JOB, str(directory)], env=ENV)
    try:
        workers = _workers(proc, directory)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 15
        while any(_alive(w) for w in workers):
            assert time.monotonic() < deadline, "the workers outlived their parent"
            time.sleep(0.1)
    finally:
        proc.kill()


@pytest.mark.slow  # 8-14 s of subprocesses: the default suite keeps the killed-worker test
def test_a_script_without_a_main_guard_is_refused_with_the_fix(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text("import chain_job\nchain_job.run(None, 'sgld', num_samples=5, chain_method='parallel')\n")
    run = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert f"top level of {script} (line 2) outside an `if __name__ == " in run.stderr
    assert "Put the call (and what should run once) under" in run.stderr
    guarded = tmp_path / "guarded.py"
    guarded.write_text("import chain_job\nif __name__ == '__main__':\n"
                       "    chain_job.run(None, 'sgld', num_samples=5, chain_method='parallel')\n    print('done')\n")
    run = subprocess.run([sys.executable, str(guarded)], env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "done" in run.stdout, run.stderr[-2000:]
