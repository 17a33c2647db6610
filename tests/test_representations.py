"""Each representation's operations against explicit float64 per-example loops over its definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vr_mcmc.per_example import Dense, Factored, LowRank, RowSparse, combine

F64 = torch.float64
B = 6


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _factored(seed=0, groups=1, t=3, d_in=4, d_out=5):
    g = _gen(seed)
    a = torch.randn(B, groups, t, d_in, generator=g, dtype=F64)
    dz = torch.randn(B, groups, t, d_out, generator=g, dtype=F64)
    rep = Factored(a, dz, (groups * d_out, d_in))
    # Definition: per example, per group, Σ_t outer(dz_t, a_t), groups stacked along rows.
    ref = torch.stack([
        torch.cat([sum(torch.outer(dz[i, k, s], a[i, k, s]) for s in range(t)) for k in range(groups)])
        for i in range(B)
    ])
    return rep, ref


def _lowrank(seed=0, r=2):
    g = _gen(seed)
    u = torch.randn(B, 5, r, generator=g, dtype=F64)
    v = torch.randn(B, r, 4, generator=g, dtype=F64)
    ref = torch.stack([sum(torch.outer(u[i, :, k], v[i, k]) for k in range(r)) for i in range(B)])
    return LowRank(u, v), ref


def _rowsparse(seed=0, rows=7, t=4):
    g = _gen(seed)
    idx = torch.randint(0, rows, (B, t), generator=g)
    idx[0, :2] = 3  # a row looked up twice by one example
    vals = torch.randn(B, t, 3, generator=g, dtype=F64)
    ref = torch.zeros(B, rows, 3, dtype=F64)
    for i in range(B):
        for s in range(t):
            ref[i, idx[i, s]] += vals[i, s]
    return RowSparse(idx, vals, rows), ref


def _dense(seed=0):
    ref = torch.randn(B, 2, 3, generator=_gen(seed), dtype=F64)
    return Dense(ref.clone()), ref


CASES = {
    "factored-T1": lambda s=0: _factored(s, t=1),
    "factored-T3": lambda s=0: _factored(s, t=3),
    "factored-gram": lambda s=0: _factored(s, t=2, d_in=8, d_out=9),  # T(d_in+d_out) < d_in d_out
    "factored-chunked": lambda s=0: _factored(s, t=6, d_in=3, d_out=2),  # dense norms path
    "factored-groups": lambda s=0: _factored(s, groups=3, t=2),
    "lowrank": _lowrank,
    "rowsparse": _rowsparse,
    "dense": _dense,
}


@pytest.mark.parametrize("case", list(CASES))
def test_operations_match_definition(case):
    rep, ref = CASES[case]()
    w = torch.randn(B, generator=_gen(9), dtype=F64)
    torch.testing.assert_close(rep.dense(), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rep.sum(), ref.sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rep.sum(w), sum(w[i] * ref[i] for i in range(B)), rtol=1e-12, atol=1e-12)
    norms = torch.stack([ref[i].square().sum() for i in range(B)])
    torch.testing.assert_close(rep.sq_norms(), norms, rtol=1e-12, atol=1e-12)
    for sel, expect in [
        ([], ref[:0]),
        (np.int64(3), ref[3:4]),
        (torch.tensor(2), ref[2:3]),
        (torch.tensor([-1, 0]), ref[[-1, 0]]),
        (torch.tensor([4, 1]), ref[[4, 1]]),
        (slice(1, 4), ref[1:4]),
        (2, ref[2:3]),
        (-1, ref[-1:]),
        (torch.arange(B) % 2 == 0, ref[::2]),
    ]:
        sub = rep.index(sel)
        assert type(sub) is type(rep)
        torch.testing.assert_close(sub.dense(), expect, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sub.sum(), expect.sum(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sub.sq_norms(), expect.flatten(1).square().sum(1), rtol=1e-12, atol=1e-12)
    assert rep.batch_size == len(rep) == B
    assert rep.shape == ref.shape[1:]
    u, v = torch.randn(ref.shape[1], 3, dtype=F64), torch.randn(ref[0].numel() // ref.shape[1], 3, dtype=F64)
    value, rss, count = rep.probe(u, v)
    expected = [sum(u[:, j] @ ref[i].reshape(len(u), -1) @ v[:, j] for i in range(B)) for j in range(3)]
    torch.testing.assert_close(value, torch.stack(expected), rtol=1e-12, atol=1e-12)
    assert count >= B and rss.shape == (3,) and bool((rss > 0).all())
    for scaled in (rep * 2.5, 2.5 * rep, (rep * -0.5) * -5):
        assert type(scaled) is type(rep)
        torch.testing.assert_close(scaled.dense(), 2.5 * ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(scaled.sum(w), 2.5 * sum(w[i] * ref[i] for i in range(B)), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(scaled.sq_norms(), 6.25 * norms, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(scaled.index([1, 3]).dense(), 2.5 * ref[[1, 3]], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(scaled.probe(u, v)[0], 2.5 * value, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_combine_same_type_stays_compact_and_exact(case):
    (r1, ref1), (r2, ref2) = CASES[case](0), CASES[case](1)
    both = combine([r1, r2])
    assert type(both) is type(r1)
    torch.testing.assert_close(both.dense(), ref1 + ref2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((r1 + r2).sq_norms(), (ref1 + ref2).flatten(1).square().sum(1), rtol=1e-12, atol=1e-12)


def test_combine_mixed_types_is_dense_and_exact():
    f, ref_f = _factored(t=2, d_in=4, d_out=5)
    lr, ref_lr = _lowrank()
    total = combine([f, lr, Dense(ref_f.clone())])
    assert isinstance(total, Dense)
    torch.testing.assert_close(total.dense(), 2 * ref_f + ref_lr)


def test_nbytes_counts_what_is_held():
    f, _ = _factored(t=3, d_in=4, d_out=5)
    assert f.nbytes == B * 3 * (4 + 5) * 8
    z = Dense.zeros(B, (100, 100), dtype=F64, device="cpu")
    assert z.nbytes == 8 and z.dense().shape == (B, 100, 100)
    rs, _ = _rowsparse()
    assert rs.nbytes == B * 4 * 8 + B * 4 * 3 * 8


def test_bad_input_is_refused_clearly():
    f, _ = _factored()
    with pytest.raises(ValueError, match=r"weights must have shape \(6,\)"):
        f.sum(torch.ones(5, dtype=F64))
    with pytest.raises(IndexError, match="out of range"):
        f.index(6)
    with pytest.raises(IndexError, match="boolean selection"):
        f.index(torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="equal B, G, T"):
        Factored(torch.zeros(2, 3, 4), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="does not hold"):
        Factored(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), shape=(5, 5))
    with pytest.raises(ValueError, match="cannot add"):
        combine([f, Dense(torch.zeros(B + 1, 5, 4, dtype=F64))])
    with pytest.raises(ValueError, match="LowRank needs"):
        LowRank(torch.zeros(2, 3, 2), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="RowSparse needs"):
        RowSparse(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, 5), 10)
