"""Gradient tables: the SAGA invariant, exactness, low-rank optimality, partitions, the planner and refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vr_mcmc.data import BlockSampler, IndexedDataset, Partition, UniformIndexSampler
from vr_mcmc.models import mlp
from vr_mcmc.per_example import PerExampleGradients
from vr_mcmc.per_example.reference import loop_per_example_grads
from vr_mcmc.storage import GradientTable, TableTooLargeError, plan, randomized_svd
from vr_mcmc.storage import table as table_module

F64 = torch.float64
N = 36


def _problem(dtype=F64, seed=0):
    """A small conv + Linear + Embedding-free model whose layers take every storage layout."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 6), nn.Tanh(),
                          nn.Linear(6, 4)).to(dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 2, 6, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (N,), generator=g)
    return model, x, y


def _grads(model, engine, x, y, idx):
    model.zero_grad()
    F.cross_entropy(model(x[idx]), y[idx]).backward()
    return engine.collect()


def _batches(table, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        if table.partition is not None:
            chosen = torch.randperm(table.partition.num_blocks, generator=g)[:3].tolist()
            yield torch.cat([table.partition.blocks[j] for j in chosen])
        else:
            yield torch.randperm(N, generator=g)[: int(torch.randint(1, 12, (1,), generator=g))]


CONFIGS = [
    dict(policy="auto"),
    dict(policy="dense"),
    dict(policy="factored"),
    dict(policy="lowrank", rank=1),
    dict(policy="lowrank", rank=3),
    dict(policy="auto", block_size=4),
    dict(policy="dense", block_size=5),  # 36 = 7 blocks of 5 + one of 1
    dict(policy="lowrank", rank=2, block_size=4),
]


@pytest.mark.parametrize("storage", [None, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_total_equals_the_sum_of_stored_rows_after_every_update(config, storage):
    model, x, y = _problem()
    engine = PerExampleGradients(model)
    table = GradientTable(model, N, dtype=storage, **config)
    every = torch.arange(N)
    for idx in _batches(table, 12):
        table.update(idx, _grads(model, engine, x, y, idx))
        stored = table.sum_rows(every)  # the rows as stored, after compression and rounding
        for name, total in table.total.items():
            # total accumulates in float64 from stored values: only float64 rounding separates them.
            assert (total - stored[name]).norm() <= 1e-12 * max(float(stored[name].norm()), 1e-300), name


@pytest.mark.parametrize("config", [dict(policy="factored"), dict(policy="auto"), dict(policy="dense"),
                                    dict(policy="lowrank", rank=64)])
def test_exact_policies_reproduce_the_per_example_gradients(config):
    model, x, y = _problem()
    engine = PerExampleGradients(model)
    table = GradientTable(model, N, **config)
    idx = torch.tensor([3, 17, 5, 30, 0])
    table.update(idx, _grads(model, engine, x, y, idx))
    ref = loop_per_example_grads(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), x[idx], y[idx])
    for k, i in enumerate(idx.tolist()):
        row = table.sum_rows(torch.tensor([i]))
        for name, r in ref.items():
            assert (row[name] - r[k]).norm() <= 1e-10 * r[k].norm(), (config, name)
    if config["policy"] == "factored":
        assert table.plan()["3.weight"][0] == "factored"


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("path", ["gram", "randomized"])
def test_rank_r_error_matches_eckart_young(path, dtype, monkeypatch):
    """The truncated SVD's dropped error is the optimal rank-r error (‖σ_{r+1:}‖/‖σ‖) within 1%, on
    both paths: the small-Gram eigendecomposition and the randomized sketch."""
    from vr_mcmc.storage import svd

    monkeypatch.setattr(svd, "_GRAM_MAX", 128 if path == "gram" else 0)
    g = torch.Generator().manual_seed(0)
    # Gradient-like matrices: decaying spectra, large enough for the randomized path (r + 10 < min(m, n)).
    u = torch.linalg.qr(torch.randn(8, 64, 64, generator=g, dtype=F64))[0]
    v = torch.linalg.qr(torch.randn(8, 96, 64, generator=g, dtype=F64))[0]
    spectrum = 0.7 ** torch.arange(64, dtype=F64)
    matrices = u @ torch.diag_embed(spectrum.expand(8, 64)) @ v.transpose(1, 2)
    for rank in (1, 4, 8):
        uu, s, vh = randomized_svd(matrices.to(dtype), rank, generator=torch.Generator().manual_seed(1))
        approx = (uu @ torch.diag_embed(s) @ vh).double()
        err = (matrices - approx).norm(dim=(1, 2)) / matrices.norm(dim=(1, 2))
        sv = torch.linalg.svdvals(matrices)
        optimal = sv[:, rank:].norm(dim=1) / sv.norm(dim=1)
        assert torch.allclose(err, optimal, rtol=1e-2), (rank, err, optimal)


def test_lowrank_table_records_the_optimal_dropped_error():
    model, x, y = _problem()
    engine = PerExampleGradients(model)
    table = GradientTable(model, N, policy="lowrank", rank=1)
    idx = torch.arange(10)
    grads = _grads(model, engine, x, y, idx)
    table.update(idx, grads)
    # The conv weight [3, 2·3·3] is stored at rank 1; the Linear weights' factors are exact and no larger.
    assert set(table.lowrank_error) == {"0.weight"} and table.plan()["3.weight"][0] == "factored"
    dense = grads["0.weight"].dense().reshape(10, 3, 18)
    sv = torch.linalg.svdvals(dense)
    optimal = sv[:, 1:].norm(dim=1) / sv.norm(dim=1)
    torch.testing.assert_close(table.lowrank_error["0.weight"], optimal, rtol=1e-2, atol=1e-12)


def test_partition_blocks_are_disjoint_cover_the_data_and_are_stable():
    p = Partition(103, 10, seed=3)
    members = torch.cat(p.blocks)
    assert sorted(members.tolist()) == list(range(103))  # cover, and disjoint (no repeats)
    assert [len(b) for b in p.blocks] == [10] * 10 + [3]
    assert all(torch.equal(a, b) for a, b in zip(p.blocks, Partition(103, 10, seed=3).blocks))
    assert not all(torch.equal(a, b) for a, b in zip(p.blocks, Partition(103, 10, seed=4).blocks))
    for j, block in enumerate(p.blocks):
        assert (p.block_of[block] == j).all()


def test_block_sampler_batches_are_unions_of_whole_blocks():
    sampler = BlockSampler(50, 4, blocks_per_batch=3, seed=0)
    seen = []
    for batch in sampler:
        rows = sampler.partition.rows(torch.tensor(batch))  # raises unless whole blocks
        assert 1 <= len(rows) <= 3
        seen += batch
    assert sorted(seen) == list(range(50))  # an epoch visits every example once
    assert list(sampler) != list(sampler)  # epochs differ ...
    assert list(BlockSampler(50, 4, 3, seed=0)) == list(BlockSampler(50, 4, 3, seed=0))  # ... reproducibly


def test_uniform_sampler_and_indexed_dataset():
    sampler = UniformIndexSampler(10, 4, seed=0)
    batches = list(sampler)
    assert [len(b) for b in batches] == [4, 4, 2] and sorted(i for b in batches for i in b) == list(range(10))
    assert len(list(UniformIndexSampler(10, 4, seed=0, drop_last=True))) == 2
    data = IndexedDataset(torch.utils.data.TensorDataset(torch.arange(10.0) * 2, torch.arange(10)))
    loader = torch.utils.data.DataLoader(data, batch_sampler=UniformIndexSampler(10, 4, seed=1))
    for idx, xs, ys in loader:
        assert torch.equal(xs, idx.double() * 2) or torch.equal(xs, idx.float() * 2)
        assert torch.equal(ys, idx)
    with pytest.raises(ValueError, match="batch_size"):
        UniformIndexSampler(3, 4)


@pytest.mark.parametrize("config", [dict(policy="dense"), dict(policy="factored"), dict(policy="auto"),
                                    dict(policy="lowrank", rank=2), dict(policy="dense", block_size=4),
                                    dict(policy="lowrank", rank=1, block_size=4)])
def test_planner_equals_the_bytes_of_an_allocated_table(config):
    model, x, y = _problem(torch.float32)
    engine = PerExampleGradients(model)
    table = GradientTable(model, N, **config)
    idx = next(_batches(table, 1))
    table.update(idx, _grads(model, engine, x, y, idx))
    engine.remove()
    planned = plan(model, x[:1], N, rank=config.get("rank", 1), block_size=config.get("block_size", 128))
    strategy = {
        ("dense", False): "naive", ("factored", False): "factored", ("auto", False): "auto",
        ("lowrank", False): "rank", ("dense", True): "partition", ("lowrank", True): "rank+partition",
    }[(config["policy"], "block_size" in config)]
    assert abs(planned.total[strategy] - table.nbytes) <= 0.01 * table.nbytes, (planned.total, table.nbytes)


def test_auto_table_for_the_mlp_is_under_two_percent_of_dense():
    planned = plan(mlp((784, 512, 512, 10)), torch.randn(1, 784), 60_000)
    assert planned.total["auto"] <= 0.02 * planned.total["naive"]


def test_a_table_too_large_for_memory_is_refused_before_allocation(monkeypatch):
    model, x, y = _problem(torch.float32)
    engine = PerExampleGradients(model)
    monkeypatch.setattr(table_module, "available_bytes", lambda device: 10_000)
    table = GradientTable(model, N, policy="dense")
    idx = torch.arange(4)
    with pytest.raises(TableTooLargeError, match=r"needs .* GB but cpu has .* free\. Cheaper strategies.*"
                                                 r"policy='lowrank', rank=1"):
        table.update(idx, _grads(model, engine, x, y, idx))
    assert table.nbytes == 0 and not table.stores  # nothing was allocated


def test_bad_input_is_refused_clearly():
    model, x, y = _problem()
    engine = PerExampleGradients(model)
    with pytest.raises(ValueError, match="policy must be one of"):
        GradientTable(model, N, policy="svd")
    with pytest.raises(ValueError, match="needs rank >= 1"):
        GradientTable(model, N, policy="lowrank")
    with pytest.raises(ValueError, match="applies to policy='lowrank' only"):
        GradientTable(model, N, rank=2)
    with pytest.raises(ValueError, match="floating-point"):
        GradientTable(model, N, dtype=torch.int8)
    table = GradientTable(model, N)
    idx = torch.arange(4)
    grads = _grads(model, engine, x, y, idx)
    with pytest.raises(IndexError, match=r"must lie in \[0, 36\)"):
        table.update(torch.tensor([0, 1, 2, 36]), grads)
    with pytest.raises(ValueError, match="twice"):
        table.update(torch.tensor([0, 1, 1, 2]), grads)
    with pytest.raises(ValueError, match="gradients for 4 examples but 3 indices"):
        table.update(torch.tensor([0, 1, 2]), grads)
    blocked = GradientTable(model, N, block_size=4)
    with pytest.raises(ValueError, match="union of whole blocks"):
        blocked.update(idx, grads)
    with pytest.raises(RuntimeError, match="chosen at its first update"):
        GradientTable(model, N).plan()


def test_sum_rows_reuse_survives_in_place_changes_and_sums_shortcut_keeps_the_invariant():
    """update() reuses the preceding sum_rows of the same batch, unless the caller modified it in place;
    with sums= (Σ_i g_i from the caller) a lossless table stays consistent."""
    model, x, y = _problem()
    engine = PerExampleGradients(model)
    table = GradientTable(model, N, policy="factored")
    every = torch.arange(N)
    for step, idx in enumerate(_batches(table, 8)):
        grads = _grads(model, engine, x, y, idx)
        old = table.sum_rows(idx)
        if step % 2:
            for t in old.values():
                t.mul_(0)  # a careless caller: the table must not trust this value any more
        sums = {n: p.grad * len(idx) for n, p in model.named_parameters()}
        table.update(idx, grads, sums)
        stored = table.sum_rows(every)
        for name, total in table.total.items():
            assert (total - stored[name]).norm() <= 1e-12 * max(float(stored[name].norm()), 1e-300), name


def _invariant_holds(table, rtol=1e-12):
    stored = table.sum_rows(torch.arange(table.num_data))
    return all((t - stored[n].to(t.dtype)).norm() <= rtol * max(float(stored[n].norm()), 1e-300)
               for n, t in table.total.items())


def test_recompute_total_then_a_full_batch_update():
    """Regression: the recomputed total once aliased the cached sum of all rows and was zeroed."""
    model, x, y = _problem()
    engine = PerExampleGradients(model)
    for block_size in (None, 4):
        table = GradientTable(model, N, block_size=block_size)
        every = torch.arange(N)
        table.update(every, _grads(model, engine, x, y, every))
        table.recompute_total()
        table.sum_rows(every)
        table.update(every, _grads(model, engine, x, y, every))
        assert _invariant_holds(table) and all(t.abs().sum() > 0 for t in table.total.values())


def test_a_non_finite_row_does_not_poison_the_total():
    """float16 storage overflows at 65504: total must come back once the row is finite again."""
    params = {"w": torch.zeros(3, dtype=torch.float32)}
    table = GradientTable(params, 4, dtype=torch.float16)
    from vr_mcmc.per_example import Dense

    table.update(torch.tensor([0]), {"w": Dense(torch.tensor([[1e5, 1.0, 1.0]]))})
    assert torch.isinf(table.total["w"][0])
    table.update(torch.tensor([0]), {"w": Dense(torch.tensor([[1.0, 1.0, 1.0]]))})
    torch.testing.assert_close(table.total["w"], torch.ones(3))


def test_float32_total_equals_the_rounded_exact_sum_after_10_000_updates():
    """Rows whose batch sums are exact in float32 (multiples of 2^-8 below 8, 64 per batch: 17 bits;
    the sums since a fold: 22 bits), so the only error left is the accumulation of ``total``
    itself. The rows' sum (about 2^17 at 2^-8 resolution: 25 bits) does not fit float32, and a
    float32 running total rounds at every update (it ends 1e-6 relative off here); after a fold
    ``total`` must be the exact float64 sum of the stored rows, rounded once: bit for bit."""
    from vr_mcmc.per_example import Dense

    n, b, steps = 1 << 15, 64, 10_000
    assert steps % table_module.FOLD_EVERY == 0  # the check falls right after a fold
    table = GradientTable({"w": torch.zeros(8)}, n)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randperm(n, generator=g)[:b]
        table.update(idx, {"w": Dense(torch.randint(0, 8 << 8, (b, 8), generator=g) / 256.0)})
    exact = table.stores["w"].data.double().sum(0)
    assert table.total["w"].dtype == torch.float32
    assert torch.equal(table.total["w"], exact.float()), (table.total["w"] - exact).abs().max()


@pytest.mark.parametrize("path", ["update", "update_packed"])
def test_total_of_a_float32_factored_table_stays_within_the_batch_sums_rounding_after_10_000_steps(path):
    """SAGA's use: float32 factored rows, Σ_i g_i of each batch given (as B·.grad). The batch sums
    themselves round in float32 (a B-term sum, ~eps32·√B of a batch's sum per step, a random walk
    over 2·10^4 sums: 8.8e-7 of the total here, measured); a float32 running total adds its own
    rounding at the scale of the total every step (4.0e-6 here, measured before the float64
    accumulator). 2e-6 separates the two. Through the per-parameter `update` and through the packed
    fast path (`update_packed`, packed rows [b, W], as SAGA's packed step gives them)."""
    from vr_mcmc.per_example import Dense, Factored

    n, b, d_in, d_out = 2000, 64, 50, 20
    params = {"w": torch.zeros(d_out, d_in), "b": torch.zeros(d_out)}
    table = GradientTable(params, n)
    g = torch.Generator().manual_seed(0)
    for step in range(10_000):
        idx = torch.randperm(n, generator=g)[:b]
        a = torch.randn(b, 1, d_in, generator=g) + 0.5
        dz = torch.randn(b, 1, d_out, generator=g) + 0.3
        if path == "update" or step == 0:  # the first update allocates the (packed) layout
            reps = {"w": Factored(a, dz, params["w"].shape), "b": Dense(dz[:, 0])}
            table.sum_rows(idx)  # as SAGA: the old rows' sum first, reused by update
            table.update(idx, reps, {"w": dz[:, 0].T @ a[:, 0], "b": dz[:, 0].sum(0)})
            continue
        packed = table.packed_rows()
        assert packed.order == ["b", "w"]  # dense parameters first
        rows = table.batch_rows(idx)
        old = packed.row_sum(packed.data.index_select(0, rows))
        new = torch.cat([dz[:, 0], a.reshape(b, -1), dz.reshape(b, -1)], 1)
        table.update_packed(rows, new, torch.cat([dz[:, 0].sum(0), (dz[:, 0].T @ a[:, 0]).reshape(-1)]), old)
    w = table.stores["w"]
    exact = {"w": torch.einsum("rgto,rgti->oi", w.grad_outputs.double(), w.inputs.double()),
             "b": table.stores["b"].data.double().sum(0)}
    for name, ref in exact.items():
        rel = float((table.total[name].double() - ref).norm() / ref.norm())
        assert rel <= 2e-6, (name, rel)


def test_low_precision_parameters_accumulate_total_in_float32():
    from vr_mcmc.per_example import Dense

    params = {"w": torch.zeros(5, dtype=torch.bfloat16)}
    table = GradientTable(params, 50)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randperm(50, generator=g)[:10]
        table.update(idx, {"w": Dense(torch.randn(10, 5, generator=g).to(torch.bfloat16))})
    assert table.total["w"].dtype == torch.float32
    assert _invariant_holds(table, rtol=1e-5)


class _TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(500, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, idx):
        return self.head(torch.tanh(self.embed(idx)).mean(1))


@pytest.mark.parametrize("config", [dict(policy="auto"), dict(policy="lowrank", rank=2),
                                    dict(policy="auto", block_size=3)])
def test_embedding_rows_are_stored_sparse_and_exact(config):
    torch.manual_seed(0)
    model = _TokenModel().double()
    tokens, y = torch.randint(0, 500, (N, 5)), torch.randint(0, 3, (N,))
    engine = PerExampleGradients(model)
    table = GradientTable(model, N, **config)
    for idx in _batches(table, 6):
        model.zero_grad()
        F.cross_entropy(model(tokens[idx]), y[idx]).backward()
        table.update(idx, engine.collect())
        assert _invariant_holds(table)
    assert table.plan()["embed.weight"][0] == "sparse"  # 5 lookups·(8+1) per row beat 500·8 and rank 2
    if "block_size" not in config:
        i = int(idx[0])
        ref = loop_per_example_grads(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), tokens[i:i + 1],
                                     y[i:i + 1])
        torch.testing.assert_close(table.sum_rows([i])["embed.weight"], ref["embed.weight"][0])


def test_a_block_row_is_the_sum_of_its_examples_gradients():
    model, x, y = _problem()
    engine = PerExampleGradients(model)
    for policy in ("factored", "dense"):
        table = GradientTable(model, N, policy=policy, block_size=5)  # 7 blocks of 5 and one of 1
        blocks = [table.partition.blocks[j] for j in (2, 7, 0)]
        idx = torch.cat(blocks)
        table.update(idx, _grads(model, engine, x, y, idx))
        ref = loop_per_example_grads(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), x, y)
        for block in blocks:
            row = table.sum_rows(block)
            for name, r in ref.items():
                torch.testing.assert_close(row[name], r[block].sum(0), rtol=1e-10, atol=1e-12)


def test_update_order_may_differ_from_sum_rows_order_and_indices_may_be_lists():
    import numpy as np

    model, x, y = _problem()
    engine = PerExampleGradients(model)
    table = GradientTable(model, N, policy="factored")
    for idx in _batches(table, 6):
        table.sum_rows(idx.tolist())
        shuffled = idx[torch.randperm(len(idx))]
        table.update(np.asarray(shuffled), _grads(model, engine, x, y, shuffled),
                     sums={n: None for n in table.params})  # None entries: not given
        assert _invariant_holds(table)


def test_sum_rows_under_inference_mode():
    model, x, y = _problem()
    engine = PerExampleGradients(model)
    table = GradientTable(model, N)
    idx = torch.arange(5)
    table.update(idx, _grads(model, engine, x, y, idx))
    with torch.inference_mode():
        table.sum_rows(idx)
    table.update(idx, _grads(model, engine, x, y, idx))
    assert _invariant_holds(table)


def test_more_bad_input():
    model, x, y = _problem()
    engine = PerExampleGradients(model)
    with pytest.raises(TypeError, match="dict"):
        GradientTable(model.parameters(), N)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        GradientTable(model, N, block_size=0)
    table = GradientTable(model, N)
    idx = torch.arange(4)
    grads = _grads(model, engine, x, y, idx)
    with pytest.raises(TypeError, match="integer example indices"):
        table.update(torch.tensor([0.0, 1.0, 2.0, 3.0]), grads)
    with pytest.raises(TypeError, match="integer example indices"):
        table.update(torch.arange(N) < 4, grads)
    wrong = dict(grads)
    wrong["5.bias"] = grads["3.bias"]
    with pytest.raises(ValueError, match="shape"):
        table.update(idx, wrong)
    assert not table.stores  # nothing allocated by the refused update


@pytest.mark.parametrize("config", [dict(policy="auto"), dict(policy="lowrank", rank=2, block_size=4),
                                    dict(policy="dense", dtype=torch.float16)])
def test_state_dict_round_trip(config, tmp_path):
    model, x, y = _problem()
    engine = PerExampleGradients(model)
    table = GradientTable(model, N, **config)
    for idx in _batches(table, 4):
        table.update(idx, _grads(model, engine, x, y, idx))
    torch.save(table.state_dict(), tmp_path / "table.pt")
    restored = GradientTable(model, N, **config)
    restored.load_state_dict(torch.load(tmp_path / "table.pt", weights_only=False))
    every = torch.arange(N)
    for n, t in table.sum_rows(every).items():
        assert torch.equal(restored.sum_rows(every)[n], t) and torch.equal(restored.total[n], table.total[n])
    assert restored.nbytes == table.nbytes
    with pytest.raises(ValueError, match="built with"):
        GradientTable(model, N, policy="dense").load_state_dict(table.state_dict())


# -- the packed layout (issue 19: SAGA-LD on small models) -------------------------------------------------------


def _saga_steps(model, x, y, table, steps, seed=3):
    """SAGA estimates (v per parameter, flattened) of a few batches through the estimator, at fixed θ."""
    from vr_mcmc.estimators import SAGA

    engine = PerExampleGradients(model)
    estimator = SAGA(table, engine)
    params = [p for p in model.parameters()]
    estimator.bind(params, N, "mean")
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        idx = torch.randperm(N, generator=g)[: int(torch.randint(2, 12, (1,), generator=g))]
        model.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        estimator.diagnose = True
        info = estimator.estimate(idx, None)
        theta = [p.detach().clone() for p in params]
        out.append((idx, torch.cat([p.grad.reshape(-1) for p in params]).clone(), info["noise_var"], theta))
        with torch.no_grad():  # move θ, so that g_i − h_i is not 0 for rows stored at another step
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    engine.remove()
    return out


def test_packed_saga_equals_an_independent_float64_saga_and_the_per_parameter_path():
    """The packed table (one [rows, W] tensor, factors and dense columns side by side) gives SAGA's estimate
    v = Σ_j h_j + (N/b)·Σ_{i∈S}(g_i − h_i) of a dense float64 reference table filled from per-example gradients of a
    Python loop, to 1e-10; the same steps with packing switched off (the per-parameter stores, views of the same
    memory) give the same estimates and noise variances to 1e-12."""
    model, x, y = _problem()
    table = GradientTable(model, N)
    runs = _saga_steps(model, x, y, table, 12)
    packed = table.packed_rows()
    assert packed is not None
    kinds = dict((n, kind) for n, (kind, _) in table.plan().items())
    assert kinds["3.weight"] == "factored" and kinds["3.bias"] == "dense"  # exact layouts kept, just side by side
    for store in table.stores.values():
        for t in store.state_tensors():
            assert t.untyped_storage().data_ptr() == packed.data.untyped_storage().data_ptr()
    _assert_a_float64_loop_saga_gives(model, x, y, runs)
    model2, _, _ = _problem()
    _assert_the_per_parameter_path_gives(model2, x, y, runs)


def _assert_a_float64_loop_saga_gives(model, x, y, runs):
    """The reference: SAGA on dense rows of every parameter, from a loop's per-example gradients at each step's θ."""
    names = [n for n, p in model.named_parameters()]
    rows = torch.zeros(N, sum(p.numel() for p in model.parameters()), dtype=F64)
    for idx, estimate, _, theta in runs:
        with torch.no_grad():
            for p, value in zip(model.parameters(), theta):
                p.copy_(value)
        per = loop_per_example_grads(model, F.cross_entropy, x[idx], y[idx])
        g = torch.cat([per[n].reshape(len(idx), -1) for n in names], 1)
        expected = rows.sum(0) + N / len(idx) * (g.sum(0) - rows[idx].sum(0))
        torch.testing.assert_close(estimate, expected, rtol=1e-10, atol=1e-10)
        rows[idx] = g


def _assert_the_per_parameter_path_gives(model, x, y, runs):
    """The same steps on a fresh copy of the model with the table's packed fast path switched off once allocated
    (the stores stay views of the packed tensor; SAGA takes the per-parameter path)."""
    table = GradientTable(model, N)
    original = table._allocate_layouts

    def allocate(layouts):
        original(layouts)
        table.packed = None

    table._allocate_layouts = allocate
    unpacked = _saga_steps(model, x, y, table, len(runs))
    assert len(unpacked) == len(runs)
    for (idx, estimate, var, _), (idx2, estimate2, var2, _) in zip(runs, unpacked):
        assert torch.equal(idx, idx2)
        torch.testing.assert_close(estimate2, estimate, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var2, var, rtol=1e-9, atol=0, equal_nan=True)


def test_a_packed_table_in_a_lower_storage_dtype_sums_what_it_stored():
    """bfloat16 rows round what is given: the packed update takes the new rows' sum from what was stored, so the
    float32 total stays the sum of the rows as stored (to float32 rounding)."""
    model, x, y = _problem(torch.float32)
    table = GradientTable(model, N, dtype=torch.bfloat16)
    _saga_steps(model, x, y, table, 1)
    packed = table.packed_rows()
    assert packed is not None and packed.data.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randperm(N, generator=g)[:8]
        rows = table.batch_rows(idx)
        old = packed.row_sum(packed.data.index_select(0, rows).float())
        new = torch.randn(8, packed.width, generator=g) + 0.5
        table.update_packed(rows, new, packed.row_sum(new), old)  # the given sum is of the unrounded rows
    assert _invariant_holds(table, rtol=1e-5)


def test_a_packed_table_whose_stores_were_replaced_takes_the_per_parameter_path():
    """Vectorized chains stack the stores' tensors across chains (the stores then hold other tensors): the packed
    fast path must see it and step aside, or it would read rows nobody writes."""
    model, x, y = _problem()
    table = GradientTable(model, N)
    _saga_steps(model, x, y, table, 1)
    assert table.packed_rows() is not None
    store = table.stores["3.bias"]
    store.data = store.data.clone()
    assert table.packed_rows() is None
    table2 = GradientTable(model, N)
    _saga_steps(model, x, y, table2, 1)
    table2._total["3.bias"] = table2._total["3.bias"].clone()
    assert table2.packed_rows() is None


@pytest.mark.parametrize("config", [dict(policy="lowrank", rank=2), dict(block_size=4)])
def test_tables_that_cannot_be_packed_are_not(config):
    model, x, y = _problem()
    table = GradientTable(model, N, **config)
    engine = PerExampleGradients(model)
    idx = next(_batches(table, 1))
    table.update(idx, _grads(model, engine, x, y, idx))
    assert table.packed is None and table.packed_rows() is None


def test_a_batch_of_another_sequence_length_is_refused_before_the_gradients_change():
    """A Linear layer's rows are stored as factors of T positions: a later batch with another T cannot be stored.
    The packed step refuses it naming the fixes, before it writes its estimate into .grad (the batch's gradient is
    left as the backward pass gave it) and without touching the table."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)).double()  # the first stored factored
    from vr_mcmc.estimators import SAGA

    engine = PerExampleGradients(model)
    estimator = SAGA(None, engine)
    estimator.bind(list(model.parameters()), N, "mean")
    for t in (5, 5, 7):
        idx = torch.arange(4) + 4 * t
        model.zero_grad()
        model(torch.randn(4, t, 16, dtype=F64)).square().mean().backward()
        if t == 7:
            before = [p.grad.clone() for p in model.parameters()]
            rows = estimator.table.packed.data.clone()
            with pytest.raises(ValueError, match=r"pad sequences to one length.*policy='dense'"):
                estimator.estimate(idx, None)
            assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))
            assert torch.equal(estimator.table.packed.data, rows)
        else:
            estimator.estimate(idx, None)
            assert estimator.table.packed_rows() is not None


class _LateConvs(nn.Module):
    """Convolutions late enough to be stored factored (2 x 2 images: T = 4 positions): a plain one (G = 1) and a
    grouped one (G = 2), then a Linear; the packed general path (groups, positions) of the gather, sum, write and
    diagnostic."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.grouped(torch.tanh(self.conv(x)))).mean(1).flatten(1))


def test_packed_saga_with_grouped_and_multi_position_factors_equals_the_float64_loop_and_per_parameter_path():
    """As the test above, for factored rows with several positions and groups (late convolutions): the packed
    estimates equal a dense float64 reference SAGA (per-example gradients from a loop) to 1e-10, and the
    per-parameter path's estimates and noise variances to 1e-12 / 1e-9."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, 8, 2, 2, generator=g, dtype=F64)
    y = torch.randint(0, 4, (N,), generator=g)
    model = _LateConvs().double()
    table = GradientTable(model, N)
    runs = _saga_steps(model, x, y, table, 10)
    kinds = {n: kind for n, (kind, _) in table.plan().items()}
    assert kinds["conv.weight"] == "factored" and kinds["grouped.weight"] == "factored", kinds
    assert table.stores["grouped.weight"].inputs.shape[1] == 2  # two groups
    assert table.packed_rows() is not None
    _assert_a_float64_loop_saga_gives(model, x, y, runs)
    torch.manual_seed(0)
    _assert_the_per_parameter_path_gives(_LateConvs().double(), x, y, runs)
