"""Unbiasedness of the estimators by exact enumeration of all batches (DESIGN.md §10).

For N ≤ 12 examples every batch S of size B (or every union of b blocks) is enumerated; the
average of an unbiased estimator's estimates over them must equal Σ_i ∇ℓ_i(θ) computed
independently (a plain sum-loss backward), to float64 rounding (≤ 1e-10 relative). The table
is first filled with gradients from *other* parameters (stale rows, some still zero), so the
correction terms do not vanish.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vr_mcmc.estimators import SAG, SAGA, SVRG, ControlVariate, Minibatch
from vr_mcmc.per_example import PerExampleGradients
from vr_mcmc.storage import GradientTable

N, B = 10, 3
TOL = 1e-10


def make_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Conv1d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(N, 1, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    return model, x, y


def full_gradient(model, x, y) -> list[torch.Tensor]:
    loss = F.cross_entropy(model(x), y, reduction="sum")
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


def perturbed(model, scale: float, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [p.detach() + scale * torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]


def set_params(model, values) -> None:
    with torch.no_grad():
        for p, v in zip(model.parameters(), values):
            p.copy_(v)


def batch_backward(model, x, y, idx) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x[idx]), y[idx])
    loss.backward()
    return loss


def enumerate_average(model, x, y, estimator, batches, reset) -> list[torch.Tensor]:
    params = list(model.parameters())
    acc = [torch.zeros_like(p) for p in params]
    for batch in batches:
        reset()
        idx = torch.tensor(batch)
        batch_backward(model, x, y, idx)
        estimator.estimate(idx, lambda idx=idx: batch_backward(model, x, y, idx))
        for a, p in zip(acc, params):
            a.add_(p.grad)
    return [a / len(batches) for a in acc]


def assert_matches(average, reference) -> None:
    for a, r in zip(average, reference):
        err = (a - r).abs().max() / r.abs().max()
        assert err <= TOL, f"relative error {err:.3g}"


TABLES = [
    dict(policy="dense"),
    dict(policy="factored"),
    dict(policy="auto"),
    dict(policy="lowrank", rank=1),
    dict(policy="auto", dtype=torch.float32),  # rows rounded to float32: still unbiased
    dict(policy="auto", block_size=2),
    dict(policy="lowrank", rank=1, block_size=2),
]


def _label(cfg):
    return ",".join(f"{k}={v}" for k, v in cfg.items())


def filled_saga(model, x, y, table_cfg, estimator_cls=SAGA):
    """A SAGA estimator whose table holds gradients from perturbed parameters (some rows zero)."""
    engine = PerExampleGradients(model)
    table = GradientTable(model, N, **table_cfg)
    estimator = estimator_cls(table, engine)
    estimator.bind(list(model.parameters()), N, "mean")
    theta = [p.detach().clone() for p in model.parameters()]
    set_params(model, perturbed(model, 0.5, seed=1))
    if table.partition is None:
        stale = [[0, 1, 2], [3, 4, 5], [8, 6]]  # rows 7 and 9 stay zero
    else:
        stale = [table.partition.blocks[j].tolist() for j in (0, 1, 3)]  # one block stays zero
    for idx in stale:
        idx = torch.tensor(idx)
        batch_backward(model, x, y, idx)
        table.update(idx, engine.collect())
    set_params(model, theta)
    return estimator, table, engine


def all_batches(table):
    if table.partition is None:
        return [list(s) for s in itertools.combinations(range(N), B)]
    blocks = table.partition.blocks
    return [torch.cat([blocks[j] for j in s]).tolist() for s in itertools.combinations(range(len(blocks)), 2)]


@pytest.mark.parametrize("table_cfg", TABLES, ids=_label)
def test_saga_is_unbiased_for_every_table(table_cfg):
    model, x, y = make_problem()
    estimator, table, engine = filled_saga(model, x, y, table_cfg)
    saved = table.state_dict()
    if table_cfg.get("policy") == "lowrank":  # the stored rows really are compressed
        assert any(float(e.max()) > 1e-3 for e in table.lowrank_error.values())
    average = enumerate_average(model, x, y, estimator, all_batches(table), lambda: table.load_state_dict(saved))
    assert_matches(average, full_gradient(model, x, y))
    engine.remove()


def test_sag_is_biased():
    """SAG's estimate (the table's total after the update) is not unbiased: the test can tell."""
    model, x, y = make_problem()
    estimator, table, engine = filled_saga(model, x, y, dict(policy="dense"), estimator_cls=SAG)
    saved = table.state_dict()
    average = enumerate_average(model, x, y, estimator, all_batches(table), lambda: table.load_state_dict(saved))
    reference = full_gradient(model, x, y)
    worst = max(float((a - r).abs().max() / r.abs().max()) for a, r in zip(average, reference))
    assert worst > 1e-3
    engine.remove()


def test_saga_table_update_follows_the_estimate():
    """After a step the batch's rows hold the batch's own per-example gradients."""
    model, x, y = make_problem()
    estimator, table, engine = filled_saga(model, x, y, dict(policy="dense"))
    idx = torch.tensor([7, 2, 5])
    batch_backward(model, x, y, idx)
    estimator.estimate(idx, None)
    for name, p in model.named_parameters():
        for i in idx.tolist():
            model.zero_grad()
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
            row = table.stores[name].rows_rep(torch.tensor([i])).dense()[0]
            torch.testing.assert_close(row, p.grad, rtol=1e-12, atol=1e-12)
    engine.remove()


@pytest.mark.parametrize("kind", ["control_variate", "svrg", "minibatch"])
def test_control_variates_and_minibatch_are_unbiased(kind):
    model, x, y = make_problem()
    from torch.utils.data import DataLoader, TensorDataset

    from vr_mcmc.data import IndexedDataset

    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=4)

    def loss_fn(xb, yb):
        return F.cross_entropy(model(xb), yb)

    theta = [p.detach().clone() for p in model.parameters()]
    centre = perturbed(model, 0.5, seed=2)
    if kind == "control_variate":
        estimator = ControlVariate(centre, loader=loader, loss_fn=loss_fn)
    elif kind == "svrg":
        estimator = SVRG(10**6, loader=loader, loss_fn=loss_fn)
    else:
        estimator = Minibatch()
    estimator.bind(list(model.parameters()), N, "mean")
    if kind == "svrg":  # snapshot at the perturbed point, then move away from it
        set_params(model, centre)
        idx = torch.tensor([0, 1, 2])
        batch_backward(model, x, y, idx)
        info = estimator.estimate(idx, lambda: batch_backward(model, x, y, idx))
        assert info["refreshed"] and info["grad_evals"] == N + 3
        set_params(model, theta)
    batches = [list(s) for s in itertools.combinations(range(N), B)]
    average = enumerate_average(model, x, y, estimator, batches, lambda: None)
    assert_matches(average, full_gradient(model, x, y))
    if kind != "minibatch":  # the centre's full gradient is Σ_i g_i(θ̃), computed independently
        set_params(model, centre)
        assert_matches(estimator.full_grad, full_gradient(model, x, y))


def test_sum_reduction_gives_the_same_estimate():
    """loss_reduction='sum' (engine and estimator told alike) gives the same SAGA estimate as 'mean'."""
    out = {}
    for reduction in ("mean", "sum"):
        model, x, y = make_problem()
        engine = PerExampleGradients(model, loss_reduction=reduction)
        estimator = SAGA(GradientTable(model, N), engine)
        estimator.bind(list(model.parameters()), N, reduction)
        for idx in ([0, 1, 2], [3, 4, 5], [0, 9, 4]):
            idx = torch.tensor(idx)
            model.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx], reduction=reduction).backward()
            estimator.estimate(idx, None)
        out[reduction] = [p.grad.clone() for p in model.parameters()]
        engine.remove()
    for a, b in zip(out["mean"], out["sum"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_saga_initialize_fills_every_row_with_one_pass():
    """After initialize(loader, loss_fn) the table's total is Σ_i g_i(θ) (independent backward) and
    the first SAGA estimate of any batch is the full gradient itself."""
    from torch.utils.data import DataLoader, TensorDataset

    from vr_mcmc.data import IndexedDataset

    model, x, y = make_problem()
    engine = PerExampleGradients(model)
    estimator = SAGA(GradientTable(model, N), engine)
    estimator.bind(list(model.parameters()), N, "mean")
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=4, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    estimator.initialize(loader, lambda xb, yb: F.cross_entropy(model(xb), yb))
    reference = full_gradient(model, x, y)
    assert_matches([estimator.table.total[n] for n, _ in model.named_parameters()], reference)
    assert all(p.grad is None for p in model.parameters())
    idx = torch.tensor([1, 4, 8])
    batch_backward(model, x, y, idx)
    estimator.estimate(idx, None)
    assert_matches([p.grad for p in model.parameters()], reference)
    partial = DataLoader(IndexedDataset(TensorDataset(x[:6], y[:6])), batch_size=3)
    with pytest.warns(UserWarning, match="visited 6 of the 10 examples"):
        estimator.initialize(partial, lambda xb, yb: F.cross_entropy(model(xb), yb))
    engine.remove()
