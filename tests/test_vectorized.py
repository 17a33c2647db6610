"""chain_method="vectorized" (issue 19, DESIGN.md §13): chain c of a vectorized run is sequential chain c with the
same seed (same init, batches and noise) up to float reduction order; resume is exact; bad input is refused
before any draw."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import torch_sample
import vr_mcmc
import vr_mcmc.data
from vr_mcmc.chains.batched import VectorizeError

N, D = 60, 4
_gen = torch.Generator().manual_seed(0)
X = torch.randn(N, D, generator=_gen)
Y = (X[:, 0] - X[:, 1] + 0.5 * torch.randn(N, generator=_gen) > 0).long()
PRIOR = torch_sample.priors.Normal(1.0)
# float32 throughout: a batched matmul sums in another order than the sequential mm, ~1e-7 relative per step;
# over 45 steps of a contracting chain the draws stay within 1e-5 (measured: ~1e-7)
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # conftest.py
    yield


def model_fn() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def loss_fn(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _loader(model):
    loader = DataLoader(vr_mcmc.data.IndexedDataset(TensorDataset(X, Y)), batch_size=20)
    return loader, (lambda x, y: loss_fn(model, (x, y)))


def sgld(m):
    return torch_sample.SGLD(m.parameters(), lr=1e-3, num_data=N, prior=PRIOR)


def sgld_diagnosed(m):  # the noise_ratio diagnostic reads per-example gradients (Factored, from the batched pass)
    return torch_sample.SGLD(m.parameters(), lr=1e-3, num_data=N, prior=PRIOR, engine=vr_mcmc.PerExampleGradients(m))


def sghmc(m):
    return torch_sample.SGHMC(m.parameters(), lr=1e-3, num_data=N, friction=0.2, prior=PRIOR)


def psgld(m):
    return torch_sample.PSGLD(m.parameters(), lr=1e-3, num_data=N, prior=PRIOR)


def sgnht(m):
    return torch_sample.SGNHT(m.parameters(), lr=1e-3, num_data=N, prior=PRIOR)


def sagald(m):
    return torch_sample.SAGALD(m.parameters(), lr=1e-3, num_data=N, engine=vr_mcmc.PerExampleGradients(m), prior=PRIOR)


def sagald_stacked(m):  # without the per-step noise diagnostic: one stacked update of all chains' tables
    sampler = sagald(m)
    sampler.noise_ratio_every = 0
    return sampler


def svrgld(m):
    loader, fn = _loader(m)
    return torch_sample.SVRGLD(m.parameters(), lr=1e-3, num_data=N, snapshot_every=7, loader=loader, loss_fn=fn,
                               prior=PRIOR)


def sgldcv(m):
    loader, fn = _loader(m)
    return torch_sample.SGLDCV(m.parameters(), lr=1e-3, num_data=N, loader=loader, loss_fn=fn, prior=PRIOR)


def run(sampler_fn, method, **kw):
    options = dict(batch_size=10, num_warmup=5, num_samples=40, num_chains=3, seed=1, progress=False)
    options.update(kw)
    return vr_mcmc.sample(model_fn, sampler_fn, loss_fn, (X, Y), chain_method=method, **options)


def assert_same_draws(a, b, atol=ATOL, exact=False, stats_tol=1e-5):
    for group in ("posterior", "sample_stats"):
        ga, gb = getattr(a, group), getattr(b, group)
        assert set(ga.data_vars) == set(gb.data_vars)
        for name in ga.data_vars:
            x, y = ga[name].values, gb[name].values
            assert x.shape == y.shape, (group, name)
            if exact:
                np.testing.assert_array_equal(x, y, err_msg=f"{group}.{name}")
            elif x.dtype.kind == "f":
                # lp is N·loss + prior: ~1e3 in size, so compare it relative
                tol = atol if group == "posterior" else max(atol, stats_tol)
                np.testing.assert_allclose(x, y, atol=tol, rtol=stats_tol, equal_nan=True, err_msg=f"{group}.{name}")
            else:
                np.testing.assert_array_equal(x, y, err_msg=f"{group}.{name}")


SAMPLERS = [sgld, sgld_diagnosed, sghmc, psgld, sgnht, sagald, sagald_stacked, svrgld, sgldcv]


@pytest.mark.parametrize("sampler_fn", SAMPLERS, ids=lambda f: f.__name__)
def test_vectorized_chain_is_the_sequential_chain(sampler_fn):
    """Same init, batches and noise: draws and sample_stats agree to float32 reduction order (ATOL); the output has
    the sequential run's groups, dims and variables."""
    seq = run(sampler_fn, "sequential")
    vec = run(sampler_fn, "vectorized")
    assert_same_draws(seq, vec)
    assert vec.posterior.attrs["chain_method"] == "vectorized"
    # the chains differ from each other (own seeds, batches and noise)
    w = vec.posterior["0.weight"].values
    assert not np.allclose(w[0], w[1])


def test_max_vectorized_groups_give_the_same_chains():
    """max_vectorized=2 runs chains {0, 1} then {2}: the same draws as one group of three."""
    one = run(sagald, "vectorized")
    two = run(sagald, "vectorized", max_vectorized=2)
    assert_same_draws(one, two)
    with pytest.raises(ValueError, match="max_vectorized"):
        run(sgld, "sequential", max_vectorized=2)
    with pytest.raises(ValueError, match="max_vectorized"):
        run(sgld, "vectorized", max_vectorized=0)


class _Interrupting:
    """loss_fn that raises KeyboardInterrupt at its ``after``-th call (a batched step calls it once)."""

    def __init__(self, after: int):
        self.after, self.calls = after, 0

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == self.after:
            raise KeyboardInterrupt
        return loss_fn(model, batch)


# ~5 s each on an idle 2-core CPU (three runs with checkpoints); the per-chain SAGA-LD path and HMC's threads are
# also resumed by the slow selection
@pytest.mark.parametrize(("sampler_fn", "after"), [
    pytest.param(sgld, 32, id="sgld"), pytest.param(sagald_stacked, 32, id="sagald_stacked"),
    pytest.param(sagald, 32, id="sagald", marks=pytest.mark.slow), pytest.param(svrgld, 60, id="svrgld"),
    pytest.param("hmc", 150, id="hmc", marks=pytest.mark.slow)])
def test_vectorized_resume_is_exact(tmp_path, sampler_fn, after):
    """Interrupted after ``after`` batched evaluations (a step of SGLD is one, of HMC ~5; checkpoints every 10
    draws), then called again: bit-identical to an uninterrupted vectorized run, including the SAGA tables, HMC's
    adaptation, the RNG states and batch streams."""
    sampler_fn = hmc if sampler_fn == "hmc" else sampler_fn
    options = dict(batch_size=10, num_warmup=5, num_samples=40, num_chains=3, seed=1, progress=False,
                   checkpoint_every=10, chain_method="vectorized")
    whole = vr_mcmc.sample(model_fn, sampler_fn, loss_fn, (X, Y), checkpoint=tmp_path / "whole", **options)
    with pytest.raises(KeyboardInterrupt) as info:
        vr_mcmc.sample(model_fn, sampler_fn, _Interrupting(after), (X, Y), checkpoint=tmp_path / "cut", **options)
    assert info.value.partial.posterior.sizes["draw"] >= 20  # the draws made before are kept
    resumed = vr_mcmc.sample(model_fn, sampler_fn, loss_fn, (X, Y), checkpoint=tmp_path / "cut", **options)
    assert_same_draws(whole.load() if hasattr(whole, "load") else whole, resumed, exact=True)


# -- bad input, refused before any draw ---------------------------------------------------------------------------


class _BatchNormNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(D, 2)
        self.bn = torch.nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_batchnorm_running_statistics_are_per_chain():
    """BatchNorm in training mode updates its running statistics in place: in the batched forward each chain's
    slice of the stacked buffers is updated, as in its sequential chain."""
    record = {"running_mean": lambda m: m.bn.running_mean.clone()}
    kw = dict(batch_size=10, num_warmup=0, num_samples=20, num_chains=2, seed=2, progress=False, record=record)
    seq = vr_mcmc.sample(_BatchNormNet, sgld, loss_fn, (X, Y), chain_method="sequential", **kw)
    vec = vr_mcmc.sample(_BatchNormNet, sgld, loss_fn, (X, Y), chain_method="vectorized", **kw)
    assert_same_draws(seq, vec)
    assert not np.allclose(vec.posterior["running_mean"].values[:, -1], 0)


class _Counting(torch.nn.Module):
    """Keeps a plain tensor attribute (not a buffer) that its forward updates in place."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(D, 2)
        self.seen = torch.zeros(2)

    def forward(self, x):
        out = self.fc(x)
        self.seen.add_(out.detach().mean(0))
        return out


class _Branching(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(D, 2)

    def forward(self, x):
        out = self.fc(x)
        return out if out.sum() > 0 else -out  # data-dependent Python control flow


def _dropout_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))


@pytest.mark.parametrize(("net", "cause"), [(_Counting, "in-place update"), (_Branching, "control flow"),
                                            (_dropout_net, "random operations")])
def test_unvectorizable_model_is_refused_before_any_draw(net, cause):
    with pytest.raises(VectorizeError, match=cause) as info:
        vr_mcmc.sample(net, sgld, loss_fn, (X, Y), batch_size=10, num_warmup=0, num_samples=5, num_chains=2,
                       chain_method="vectorized", progress=False)
    assert 'chain_method="sequential"' in str(info.value)
    assert info.value.partial is None  # no draw was made


def test_chains_of_different_architectures_are_refused():
    widths = itertools.cycle([8, 9])  # chain 1 gets a wider hidden layer

    def varying():
        width = next(widths)
        return torch.nn.Sequential(torch.nn.Linear(D, width), torch.nn.Tanh(), torch.nn.Linear(width, 2))

    with pytest.raises(ValueError, match="different model for chain"):
        vr_mcmc.sample(varying, sgld, loss_fn, (X, Y), batch_size=10, num_warmup=0, num_samples=5, num_chains=2,
                       chain_method="vectorized", progress=False)


# -- closure samplers: each chain's own step, its closure evaluated in a batch with the others' --------------------


def ula(m):
    return torch_sample.ULA(m.parameters(), lr=1e-3, num_data=N, prior=PRIOR)


def mala(m):
    return torch_sample.MALA(m.parameters(), lr=1e-3, num_data=N, prior=PRIOR)


def hmc(m):
    return torch_sample.HMC(m.parameters(), lr=5e-3, num_data=N, num_leapfrog=4, prior=PRIOR)


def nuts(m):
    return torch_sample.NUTS(m.parameters(), lr=5e-3, num_data=N, max_tree_depth=4, prior=PRIOR)


def model_fn64() -> torch.nn.Module:
    return model_fn().double()


@pytest.mark.parametrize("sampler_fn", [ula, mala, hmc, nuts], ids=lambda f: f.__name__)
def test_vectorized_closure_sampler_is_the_sequential_chain(sampler_fn):
    """Per-chain step sizes (dual averaging in warmup), metrics, accept/reject and NUTS trees: the chains' own
    sampler code, fed batched evaluations; draws and sample_stats as sequential chains'. In float64: leapfrog
    trajectories and dual averaging amplify float32's reduction-order differences to ~1e-3 within 30 steps (measured),
    which would hide a real difference; in float64 they stay ~1e-10, and a differing momentum, accept/reject or
    tree decision would move a draw by a step (~1e-2)."""
    options = dict(batch_size=10, num_warmup=15, num_samples=15, num_chains=3, seed=1, progress=False)
    data = (X.double(), Y)
    seq = vr_mcmc.sample(model_fn64, sampler_fn, loss_fn, data, chain_method="sequential", **options)
    vec = vr_mcmc.sample(model_fn64, sampler_fn, loss_fn, data, chain_method="vectorized", **options)
    assert_same_draws(seq, vec, atol=1e-8, stats_tol=1e-8)
    if sampler_fn is not ula:  # adaptation ran per chain: the chains end with different step sizes
        sizes = vec.sample_stats["step_size"].values[:, -1]
        assert len(set(sizes.tolist())) == len(sizes)


@pytest.mark.slow
@pytest.mark.parametrize("sampler_fn", [sgld, sghmc], ids=lambda f: f.__name__)
def test_resume_with_chains_at_different_steps(tmp_path, sampler_fn):
    """A checkpoint where one chain is behind the others (here: its files deleted, so it starts again): the chains
    that are behind step alone (their samplers' own steps) until they catch up, then all step together (stacked,
    SGHMC's momenta re-stacked); the result equals an uninterrupted run's, bit for bit, stats included."""
    options = dict(batch_size=10, num_warmup=5, num_samples=40, num_chains=3, seed=1, progress=False,
                   checkpoint_every=10, chain_method="vectorized")
    whole = vr_mcmc.sample(model_fn, sampler_fn, loss_fn, (X, Y), checkpoint=tmp_path / "whole", **options)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        vr_mcmc.sample(model_fn, sampler_fn, _Interrupting(32), (X, Y), checkpoint=cut, **options)
    for path in cut.glob("*chain_1.*"):
        path.unlink()
    resumed = vr_mcmc.sample(model_fn, sampler_fn, loss_fn, (X, Y), checkpoint=cut, **options)
    assert_same_draws(whole, resumed, exact=True)


@pytest.mark.slow
def test_vectorized_nuts_matches_the_reference_posterior():
    """4 vectorized NUTS chains (500 warmup, 1000 draws) on posteriordb's eight schools (non-centred) against the
    rstan reference draws, with tests/test_refposterior_sampling.py's criteria: every mean within 4 combined MCSE,
    sd within 10%, R-hat < 1.01 (64 s on a loaded 2-core CPU; passed with the largest |z| = 1.0)."""
    refposteriors = pytest.importorskip("refposteriors")
    if not refposteriors.available():
        pytest.skip(refposteriors.unavailable_reason())
    from test_refposterior_sampling import check

    post = refposteriors.POSTERIORS["eight_schools-eight_schools_noncentered"]
    idata = vr_mcmc.sample(post.module(), lambda m: torch_sample.NUTS(m.parameters(), lr=0.1, num_data=1),
                           post.loss, torch.zeros(1), batch_size=1, num_warmup=500,
                           num_samples=1000, num_chains=4, seed=5, chain_method="vectorized", progress=False)
    assert check(post, np.asarray(idata.posterior["theta"].values)) == []


def test_a_sequential_checkpoint_resumes_vectorized(tmp_path):
    """The chains' checkpoint files are the sequential ones: a sequential run cut short resumes as a vectorized one,
    and gives the sequential run's draws (to float order)."""
    options = dict(batch_size=10, num_warmup=0, num_samples=20, num_chains=2, seed=4, progress=False,
                   checkpoint_every=5)
    whole = vr_mcmc.sample(model_fn, sagald, loss_fn, (X, Y), checkpoint=tmp_path / "whole", **options)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):  # chain 0 done, chain 1 at step 12 (checkpoint at 10)
        vr_mcmc.sample(model_fn, sagald, _Interrupting(33), (X, Y), checkpoint=cut, **options)
    resumed = vr_mcmc.sample(model_fn, sagald, loss_fn, (X, Y), checkpoint=cut, chain_method="vectorized", **options)
    assert_same_draws(whole, resumed)


def _layernorm_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


@pytest.mark.parametrize("sampler_fn", [sagald, sagald_stacked], ids=lambda f: f.__name__)
def test_saga_on_layers_beyond_linear_uses_dense_per_example_gradients(sampler_fn):
    """A parameter outside a Linear layer (LayerNorm's): per-example gradients from vmap over chains of vmap over
    examples (Dense rows); the chains equal the sequential ones, whose engine uses the LayerNorm rule."""
    kw = dict(batch_size=10, num_warmup=0, num_samples=25, num_chains=2, seed=6, progress=False)
    seq = vr_mcmc.sample(_layernorm_net, sampler_fn, loss_fn, (X, Y), chain_method="sequential", **kw)
    vec = vr_mcmc.sample(_layernorm_net, sampler_fn, loss_fn, (X, Y), chain_method="vectorized", **kw)
    assert_same_draws(seq, vec)


def test_a_summed_loss_is_warned_about_as_in_sequential_chains():
    """The batched pass hides the loss's autograd node; the driver shows it to the sampler's check once."""
    def summed(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    with pytest.warns(UserWarning, match="looks like a sum over the batch"):
        vr_mcmc.sample(model_fn, sgld, summed, (X, Y), batch_size=10, num_warmup=0, num_samples=3, num_chains=2,
                       chain_method="vectorized", progress=False)


def test_vectorized_does_not_combine_with_data_parallel():
    with pytest.raises(ValueError, match="one process"):
        run(sgld, "vectorized", data_parallel=True)


@pytest.mark.parametrize("sampler_fn", [sgld, sagald_stacked])
def test_kept_parameters_of_vectorized_chains_are_the_sequential_ensemble(tmp_path, sampler_fn):
    """keep_params with vectorized chains (whose parameters are views into stacked tensors): the ensemble has the
    sequential run's draws, each state dict within ATOL of the sequential one (float32 reduction order)."""
    seq = run(sampler_fn, "sequential", keep_params=4, checkpoint=tmp_path / "seq")
    vec = run(sampler_fn, "vectorized", keep_params=4, checkpoint=tmp_path / "vec")
    assert_same_draws(seq, vec)
    a = vr_mcmc.PosteriorEnsemble(tmp_path / "seq", model_fn())
    b = vr_mcmc.PosteriorEnsemble(tmp_path / "vec", model_fn())
    assert len(a) == len(b) == 3 * 10 and a.draw_indices == b.draw_indices
    for i in range(len(a)):
        for name, value in a[i].items():
            torch.testing.assert_close(b[i][name], value, atol=ATOL, rtol=0)
    assert not torch.equal(a[0]["0.weight"], a[len(a) - 1]["0.weight"])  # the chains moved


def test_a_factored_table_from_a_sequential_run_is_refused_for_a_dense_vectorized_pass(tmp_path):
    """A sequential SAGA-LD run of a model with a LayerNorm (its Linear layers' rows stored factored) cut short: the
    vectorized pass of that model gives dense per-example gradients, so resuming it vectorized is refused with the
    fix named, and the sequential resume then still gives the uninterrupted run's draws exactly."""
    options = dict(batch_size=10, num_warmup=0, num_samples=20, num_chains=2, seed=4, progress=False,
                   checkpoint_every=5)
    whole = vr_mcmc.sample(_layernorm_net, sagald, loss_fn, (X, Y), checkpoint=tmp_path / "whole", **options)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        vr_mcmc.sample(_layernorm_net, sagald, _Interrupting(33), (X, Y), checkpoint=cut, **options)
    with pytest.raises(VectorizeError, match=r"stored factored .* resume this run with chain_method='sequential'"):
        vr_mcmc.sample(_layernorm_net, sagald, loss_fn, (X, Y), checkpoint=cut, chain_method="vectorized", **options)
    resumed = vr_mcmc.sample(_layernorm_net, sagald, loss_fn, (X, Y), checkpoint=cut, **options)
    assert_same_draws(whole, resumed, exact=True)


# -- stacked steps of every SG diffusion (torch_sample.vectorized) -------------------------------------------------


def sghmc_saga(m):  # SAGA's estimate in SGHMC's diffusion: the stacked tables feed the stacked momentum update
    sampler = torch_sample.SGHMC(m.parameters(), lr=1e-3, num_data=N, friction=0.2, prior=PRIOR,
                                 estimator=vr_mcmc.estimators.SAGA(), engine=vr_mcmc.PerExampleGradients(m))
    sampler.noise_ratio_every = 0
    return sampler


def _counting_stacked_steps(monkeypatch) -> list[bool]:
    """Records what each stacked step returned (a spy that calls the real step)."""
    from torch_sample.vectorized import StackedStep

    made: list[bool] = []
    real = StackedStep.step

    def spy(self, *args, **kw):
        made.append(real(self, *args, **kw))
        return made[-1]

    monkeypatch.setattr(StackedStep, "step", spy)
    return made


def sagald_every_3rd(m):  # the noise diagnostic on some steps only (NaN between)
    sampler = sagald(m)
    sampler.noise_ratio_every = 3
    return sampler


def sgld_momentum(m):  # torch.optim.SGD's heavy ball with noise (SGLD's SGHMC form)
    return torch_sample.SGLD(m.parameters(), lr=1e-3, num_data=N, momentum=0.9, prior=PRIOR)


def csgld(m):  # a schedule: step size and temperature per step (45 = num_warmup + num_samples of run)
    return torch_sample.SGLD(m.parameters(), lr=1e-3, num_data=N, prior=PRIOR,
                             schedule=torch_sample.schedules.Cyclical(2, 45, exploration=0.5))


def csghmc(m):
    return torch_sample.SGHMC(m.parameters(), lr=1e-3, num_data=N, friction=0.2, prior=PRIOR,
                              schedule=torch_sample.schedules.Cyclical(3, 45, exploration=0.3))


def sghmc_auto(m):  # β from each chain's own noise diagnostic (per-example gradients of the batched pass)
    return torch_sample.SGHMC(m.parameters(), lr=1e-3, num_data=N, friction=0.2, beta="auto", prior=PRIOR,
                              engine=vr_mcmc.PerExampleGradients(m))


@pytest.mark.parametrize("sampler_fn", [sgld, sghmc, psgld, sgnht, sagald_stacked, sghmc_saga, sgld_diagnosed,
                                        sagald, sagald_every_3rd, sgld_momentum, csgld, csghmc, sghmc_auto],
                         ids=lambda f: f.__name__)
def test_stacked_diffusions_are_the_sequential_chains(monkeypatch, sampler_fn):
    """Every SG diffusion with a minibatch or SAGA estimate steps all chains at once (each step after the first,
    which allocates the states and tables, is stacked) and still gives the sequential chains: draws and their own
    stats (kinetic energy, thermostat, preconditioner, and noise_ratio from the stacked per-example gradients and
    tables) within ATOL / rtol 1e-5."""
    seq = run(sampler_fn, "sequential")
    made = _counting_stacked_steps(monkeypatch)
    vec = run(sampler_fn, "vectorized")
    assert_same_draws(seq, vec)
    assert len(made) >= 44 and all(made)  # 45 steps, the first per chain for SAGA's table allocation
    ratio = vec.sample_stats["noise_ratio"].values
    if sampler_fn in (sgld_diagnosed, sagald):
        assert np.isfinite(ratio[:, 1:]).all()
    elif sampler_fn is sagald_every_3rd:  # step s (from 0; draw s − 5 after 5 warmup steps) measures if s % 3 == 0
        assert np.isfinite(ratio[:, 1::3]).all() and np.isnan(ratio[:, 2::3]).all()


def _varying(make):
    """A sampler_fn whose chains get different options (chain c the c-th of a cycle): the stacked step's
    per-chain coefficients ([C, 1, ...] tensors) instead of one scalar."""
    options = itertools.cycle([dict(lr=1e-3), dict(lr=2e-3), dict(lr=5e-4)])
    return lambda m: make(m, **next(options))


@pytest.mark.parametrize("make", [
    lambda m, lr: torch_sample.SGLD(m.parameters(), lr=lr, num_data=N, prior=PRIOR),
    lambda m, lr: torch_sample.SGHMC(m.parameters(), lr=lr, num_data=N, friction=100 * lr, beta=20 * lr,
                                     prior=PRIOR),
    lambda m, lr: torch_sample.PSGLD(m.parameters(), lr=lr, num_data=N, alpha=1 - 10 * lr, eps=lr, prior=PRIOR),
    lambda m, lr: torch_sample.SGNHT(m.parameters(), lr=lr, num_data=N, friction=500 * lr, prior=PRIOR),
], ids=["sgld", "sghmc", "psgld", "sgnht"])
def test_stacked_step_with_per_chain_options(monkeypatch, make):
    """Chains with their own step size (and friction, beta, alpha, eps): each its sequential chain."""
    seq = run(_varying(make), "sequential")
    made = _counting_stacked_steps(monkeypatch)
    vec = run(_varying(make), "vectorized")
    assert_same_draws(seq, vec)
    assert made and all(made)
    sizes = vec.sample_stats["step_size"].values[:, -1]
    assert len(set(sizes.tolist())) == 3


def test_frozen_preconditioner_and_resumed_states_are_per_chain(tmp_path):
    """pSGLD frozen after warmup (the stacked step keeps V) and cut by an interrupt: the resumed run (states
    re-stacked from the chains' checkpoints) is bit-identical to an uninterrupted one; each checkpoint holds its
    chain's own momentum-like state, not the stacked tensor."""
    def frozen(m):
        # eps well above the smallest |∇Ũ| of the first step, which V keeps for good: with 1e-5 a coordinate's
        # G of up to 1e5 magnifies the batched sums' float32 rounding past ATOL (measured 3e-5)
        sampler = torch_sample.PSGLD(m.parameters(), lr=1e-3, num_data=N, eps=0.1, prior=PRIOR)
        sampler.preconditioner_frozen = True  # from the first stored V on
        return sampler

    options = dict(batch_size=10, num_warmup=5, num_samples=40, num_chains=3, seed=1, progress=False,
                   checkpoint_every=10, chain_method="vectorized")
    whole, resumed = _whole_and_resumed(tmp_path, frozen, options)
    assert_same_draws(whole, resumed, exact=True)
    seq = vr_mcmc.sample(model_fn, frozen, loss_fn, (X, Y), **{**options, "chain_method": "sequential",
                                                              "checkpoint_every": 100})
    assert_same_draws(seq, whole)
    saved = [torch.load(p, weights_only=False) for p in sorted((tmp_path / "whole").rglob("*.pt"))]
    states = [s["sampler"]["state"] for s in saved if isinstance(s, dict) and "sampler" in s]
    assert states
    for state in states:
        for entry in state.values():
            v = entry["square_avg"]
            assert v.untyped_storage().nbytes() == v.numel() * v.element_size()  # its own slice only


@pytest.mark.parametrize("sampler_fn", [sghmc, pytest.param(sgnht, marks=pytest.mark.slow)],
                         ids=lambda f: getattr(f, "__name__", "sgnht"))
def test_stacked_momentum_resume_is_exact(tmp_path, sampler_fn):
    """SGHMC / SGNHT (stacked momentum and thermostats) interrupted and resumed: bit-identical."""
    options = dict(batch_size=10, num_warmup=5, num_samples=40, num_chains=3, seed=1, progress=False,
                   checkpoint_every=10, chain_method="vectorized")
    assert_same_draws(*_whole_and_resumed(tmp_path, sampler_fn, options), exact=True)


def _whole_and_resumed(tmp_path, sampler_fn, options):
    """An uninterrupted run, and the same run interrupted at step 32 and resumed from its checkpoint."""
    whole = vr_mcmc.sample(model_fn, sampler_fn, loss_fn, (X, Y), checkpoint=tmp_path / "whole", **options)
    with pytest.raises(KeyboardInterrupt):
        vr_mcmc.sample(model_fn, sampler_fn, _Interrupting(32), (X, Y), checkpoint=tmp_path / "cut", **options)
    resumed = vr_mcmc.sample(model_fn, sampler_fn, loss_fn, (X, Y), checkpoint=tmp_path / "cut", **options)
    return whole, resumed


# -- torch.compile of the batched computations ---------------------------------------------------------------------


@pytest.mark.parametrize("sampler_fn", [sgld, sagald_stacked], ids=lambda f: f.__name__)
def test_compiled_vectorized_chains_are_the_sequential_chains(sampler_fn):
    """vectorized_compile=True (one compilation per group, ~3-8 s here): the sequential chains within ATOL. Batches
    of 25 out of 60: every epoch ends with a batch of 10, which runs eager (no second compilation)."""
    seq = run(sampler_fn, "sequential", batch_size=25)
    vec = run(sampler_fn, "vectorized", batch_size=25, vectorized_compile=True)
    assert_same_draws(seq, vec)


def test_a_failing_compilation_warns_once_and_runs_eager(monkeypatch):
    """A compiler that cannot build (here: inductor's C++ compiler is not there, its caches off): one warning,
    and the eager computation's draws."""
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor, "force_disable_caches", True)
    eager = run(sgld, "vectorized", vectorized_compile=False)
    with pytest.warns(RuntimeWarning, match="torch.compile of the batched gradient failed") as record:
        broken = run(sgld, "vectorized", vectorized_compile=True)
    assert len([w for w in record if "torch.compile" in str(w.message)]) == 1
    assert_same_draws(eager, broken, exact=True)


def test_vectorized_compile_is_checked():
    with pytest.raises(TypeError, match="vectorized_compile must be True, False or None"):
        run(sgld, "vectorized", vectorized_compile="yes")
    with pytest.raises(ValueError, match="option of chain_method='vectorized'"):
        run(sgld, "sequential", vectorized_compile=True)


class _CountingLoss:
    """loss_fn that counts its calls (a batched evaluation of all chains calls it once)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model, batch):
        self.calls += 1
        return loss_fn(model, batch)


def svrgld_diagnosed(m):  # noise_ratio from the per-example gradients at θ and at the centre
    loader, fn = _loader(m)
    return torch_sample.SVRGLD(m.parameters(), lr=1e-3, num_data=N, snapshot_every=7, loader=loader, loss_fn=fn,
                               prior=PRIOR, engine=vr_mcmc.PerExampleGradients(m))


def sgldcv_diagnosed(m):
    loader, fn = _loader(m)
    return torch_sample.SGLDCV(m.parameters(), lr=1e-3, num_data=N, loader=loader, loss_fn=fn, prior=PRIOR,
                               engine=vr_mcmc.PerExampleGradients(m))


@pytest.mark.parametrize("sampler_fn", [svrgld_diagnosed, sgldcv_diagnosed], ids=lambda f: f.__name__)
def test_closure_estimators_evaluate_all_chains_at_once(sampler_fn):
    """SVRG-LD / SGLD-CV: each chain's step runs in its thread and its two closures a step (at θ and at the
    centre) are evaluated with the other chains' in one batched computation: ~2 calls of loss_fn a step for the
    3 chains, not 2 per chain (their full-gradient passes use the sampler's own loss_fn); the draws, noise_ratio
    included (per-example gradients from the batched pass), are the sequential chains'."""
    seq = run(sampler_fn, "sequential")
    counting = _CountingLoss()
    vec = vr_mcmc.sample(model_fn, sampler_fn, counting, (X, Y), chain_method="vectorized", batch_size=10,
                         num_warmup=5, num_samples=40, num_chains=3, seed=1, progress=False)
    assert_same_draws(seq, vec)
    assert counting.calls <= 2 * 45 + 2
    assert np.isfinite(vec.sample_stats["noise_ratio"].values[:, 1:]).mean() > 0.5


@pytest.mark.slow
@pytest.mark.parametrize("sampler_fn", [hmc, nuts], ids=lambda f: f.__name__)
def test_compiled_closure_samplers_are_the_sequential_chains(sampler_fn):
    """Compiled full-data evaluations (float64): HMC / NUTS chains within 1e-8 of the sequential ones."""
    options = dict(batch_size=10, num_warmup=10, num_samples=15, num_chains=3, seed=1, progress=False)
    data = (X.double(), Y)
    seq = vr_mcmc.sample(model_fn64, sampler_fn, loss_fn, data, chain_method="sequential", **options)
    vec = vr_mcmc.sample(model_fn64, sampler_fn, loss_fn, data, chain_method="vectorized", vectorized_compile=True,
                         **options)
    assert_same_draws(seq, vec, atol=1e-8, stats_tol=1e-8)


@pytest.mark.slow
def test_compiled_dense_per_example_path_is_the_sequential_chain():
    """SAGA-LD on a model with a LayerNorm (dense per-example gradients, vmap of vmap) compiled."""
    kw = dict(batch_size=10, num_warmup=0, num_samples=25, num_chains=2, seed=6, progress=False)
    seq = vr_mcmc.sample(_layernorm_net, sagald, loss_fn, (X, Y), chain_method="sequential", **kw)
    vec = vr_mcmc.sample(_layernorm_net, sagald, loss_fn, (X, Y), chain_method="vectorized", vectorized_compile=True,
                         **kw)
    assert_same_draws(seq, vec)


class _InterruptingRecord:
    """A recorded function that raises KeyboardInterrupt at its ``after``-th call (one call per chain and draw):
    an interrupt that does not go through loss_fn, which a compiled pass calls only while tracing."""

    def __init__(self, after: float):
        self.after, self.calls = after, 0

    def __call__(self, model):
        self.calls += 1
        if self.calls == self.after:
            raise KeyboardInterrupt
        return model[-1].bias


@pytest.mark.slow
def test_compiled_resume_is_exact(tmp_path):
    """Compiled chains with batches of 25 of 60 (an eager batch of 10 ends each epoch) cut at step 28 and resumed
    from the checkpoint of step 20, whose next batch is an epoch's short one (a new compilation): bit-identical to
    the uninterrupted compiled run, since the compiled shape is the run's batch size whichever batch a run starts
    with."""
    options = dict(batch_size=25, num_warmup=5, num_samples=40, num_chains=3, seed=1, progress=False,
                   checkpoint_every=10, chain_method="vectorized", vectorized_compile=True)
    whole = vr_mcmc.sample(model_fn, sgld, loss_fn, (X, Y), checkpoint=tmp_path / "whole",
                           record={"b": _InterruptingRecord(math.inf)}, **options)
    with pytest.raises(KeyboardInterrupt):
        vr_mcmc.sample(model_fn, sgld, loss_fn, (X, Y), checkpoint=tmp_path / "cut",
                       record={"b": _InterruptingRecord(3 * 23)}, **options)
    resumed = vr_mcmc.sample(model_fn, sgld, loss_fn, (X, Y), checkpoint=tmp_path / "cut",
                             record={"b": _InterruptingRecord(math.inf)}, **options)
    assert_same_draws(whole, resumed, exact=True)
