"""What the driver `vr_mcmc.sample` adds around a sampler: partition sampling with a partitioned SAGA table
(issue 15.3) and the ``data_passes`` statistic it counts itself (issue 15.14)."""

from __future__ import annotations

import chain_job
import numpy as np
import pytest
import torch

import torch_sample
import vr_mcmc
from vr_mcmc.chains import chain_seeds
from vr_mcmc.chains.stream import BlockStream, IndexStream, index_stream
from vr_mcmc.data import Partition

BLOCK = 10


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # conftest.py
    yield


def partitioned_sagald(model: torch.nn.Module) -> torch.optim.Optimizer:
    engine = vr_mcmc.PerExampleGradients(model)
    return torch_sample.SAGALD(model.parameters(), lr=2e-3, num_data=chain_job.N, engine=engine, block_size=BLOCK,
                               seed=5, prior=torch_sample.priors.Normal(2.0))


def test_partitioned_saga_ld_runs_through_sample():
    """2 chains × 15 epochs (120 examples, blocks of 10, batches of 2 blocks): every batch must be a union of
    whole blocks of the table's partition (the table refuses any other batch, as it did every uniform batch the
    driver drew before), and the chains' posterior means agree with SGLD's on the same model (both within
    0.25; posterior sds are ~0.25)."""
    idata = chain_job.run(None, "sgld", num_samples=60, num_warmup=30)
    sagald = vr_mcmc.sample(chain_job.model_fn, partitioned_sagald, chain_job.loss_fn, (chain_job.X, chain_job.Y),
                            batch_size=20, num_chains=2, num_warmup=30, num_samples=60, seed=3, progress=False)
    assert sagald.posterior.sizes["chain"] == 2 and sagald.posterior.sizes["draw"] == 60
    assert np.isfinite(sagald.posterior["weight"].values).all()
    assert not sagald.sample_stats["diverging"].values.any()
    # 90 steps of 20 examples: 15 passes
    np.testing.assert_allclose(sagald.sample_stats["data_passes"].values[:, -1], 15.0)
    assert not np.array_equal(sagald.posterior["weight"].values[0], sagald.posterior["weight"].values[1])
    # a long run would be needed to compare posteriors; a sanity bound only: the same sign pattern as SGLD's
    mean = sagald.posterior["weight"].mean(("chain", "draw")).values.ravel()
    ref = idata.posterior["weight"].mean(("chain", "draw")).values.ravel()
    assert (np.sign(mean) == np.sign(ref)).all(), (mean, ref)


def test_block_stream_draws_whole_blocks_with_its_own_seed():
    """index_stream gives a partitioned sampler block batches over the table's own partition, every block once
    an epoch; the order's seed is decorrelated from the partition's (chain 0 of seed 0 used to draw the
    partition's permutation itself) and differs between chains."""
    model = chain_job.model_fn()
    sampler = partitioned_sagald(model)
    partition = sampler.estimator.table.partition
    stream = index_stream(sampler, chain_job.N, 20, chain_seeds(0, 0)[1])
    assert isinstance(stream, BlockStream) and stream.partition is partition and stream.blocks_per_batch == 2
    assert isinstance(index_stream(chain_job.sgld(model), chain_job.N, 20, 0), IndexStream)
    for _epoch in range(3):
        seen = torch.cat([stream.next() for _ in range(6)])
        assert sorted(seen.tolist()) == list(range(chain_job.N))  # each example once an epoch
        partition.rows(seen[:20])  # raises unless a union of whole blocks
    # the stream seed that equals the table's seed does not replay the partition's permutation
    same = Partition(chain_job.N, BLOCK, seed=0)
    plain = BlockStream(same, 1, seed=0)
    first = torch.stack([plain.next()[0] for _ in range(same.num_blocks)])
    assert not torch.equal(first, torch.cat([b[:1] for b in same.blocks]))
    orders = [BlockStream(partition, 1, chain_seeds(0, c)[1]) for c in range(4)]
    firsts = [tuple(int(s.next()[0]) for _ in range(6)) for s in orders]
    assert len(set(firsts)) == 4


def test_block_stream_resumes_exactly():
    partition = Partition(chain_job.N, BLOCK, seed=1)
    a, b = BlockStream(partition, 3, seed=7), BlockStream(partition, 3, seed=7)
    for _ in range(5):
        a.next()
    b.load_state_dict(a.state_dict())
    for _ in range(9):
        assert torch.equal(a.next(), b.next())


class OwnPasses(torch_sample.SGLD):
    def step(self, *args, **kwargs):
        out = super().step(*args, **kwargs)
        self.stats["data_passes"] = 42.0
        return out


def own_passes(model):
    return OwnPasses(model.parameters(), lr=2e-3, num_data=chain_job.N)


def test_driver_records_data_passes():
    """data_passes = Σ grad_evals / N since the start, warmup included, at every kept draw: batches of 20 of
    120 examples, 50 warmup steps, thin 2; HMC's L·N evaluations a step; SVRG's snapshot passes; a sampler's
    own data_passes is kept as it reports it."""
    sgld = chain_job.run(None, "sgld", num_samples=40, thin=2, save_warmup=True)
    steps = 50 + 2 * np.arange(1, 21)
    np.testing.assert_allclose(sgld.sample_stats["data_passes"].values, np.tile(steps * 20 / 120, (2, 1)))
    np.testing.assert_allclose(sgld.warmup_sample_stats["data_passes"].values[0], np.arange(2, 51, 2) * 20 / 120)
    hmc = chain_job.run(None, "hmc", num_samples=10, num_warmup=5)
    np.testing.assert_allclose(hmc.sample_stats["data_passes"].values[0], 5.0 * np.arange(6, 16))
    svrg = chain_job.run(None, "svrg", num_samples=30, num_warmup=0, num_chains=1)
    evals = svrg.sample_stats["grad_evals"].values[0]
    assert evals.max() > 2 * 20  # snapshot passes are counted
    np.testing.assert_allclose(svrg.sample_stats["data_passes"].values[0], np.cumsum(evals) / chain_job.N)
    own = vr_mcmc.sample(chain_job.model_fn, own_passes, chain_job.loss_fn, (chain_job.X, chain_job.Y), batch_size=20,
                         num_chains=1, num_warmup=2, num_samples=3, progress=False)
    assert (own.sample_stats["data_passes"].values == 42.0).all()


def _threads_seen(**kw) -> np.ndarray:
    idata = vr_mcmc.sample(chain_job.model_fn, chain_job.sgld, chain_job.loss_fn, (chain_job.X, chain_job.Y),
                           batch_size=20, num_chains=2, num_warmup=2, num_samples=3, progress=False,
                           record={"threads": lambda m: torch.get_num_threads()}, **kw)
    return idata.posterior["threads"].values


def test_num_threads_default_and_restore():
    """num_threads=None runs a small model on one thread, an explicit num_threads is used as given, and the
    caller's setting comes back after the run (also after an error); models of 1M parameters or more keep
    torch's setting (checked on the choice itself: building one here would be slow)."""
    from vr_mcmc.chains.sampling import SMALL_MODEL, default_threads

    torch.set_num_threads(2)
    assert (_threads_seen() == 1).all()
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    assert (_threads_seen(num_threads=2) == 2).all()
    assert torch.get_num_threads() == 1

    def failing_loss(model, batch):
        raise RuntimeError("boom")

    torch.set_num_threads(2)
    with pytest.raises(RuntimeError, match="boom"):
        vr_mcmc.sample(chain_job.model_fn, chain_job.sgld, failing_loss, (chain_job.X, chain_job.Y), batch_size=20,
                       num_chains=1, num_warmup=0, num_samples=2, progress=False)
    assert torch.get_num_threads() == 2
    big = {"model": {"param:w": [SMALL_MODEL, "torch.float32"]}}
    small = {"model": {"param:w": [10, 10, "torch.float32"], "buffer:b": [10**7, "torch.float32"]}}
    assert default_threads(big, parallel=False) is None and default_threads(small, parallel=False) == 1
    assert default_threads(big, parallel=True) == 1
    with pytest.raises(ValueError, match="num_threads"):
        _threads_seen(num_threads=0)
