"""Predictive scores (TV, agreement), reference files and the digits BNN problem they are made for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn")

from vr_mcmc.digits import DigitsBNN
from vr_mcmc.predictive import (
    PredictiveReference,
    agreement,
    available_references,
    load_reference,
    predictive_scores,
    total_variation,
)
from vr_mcmc.sg_compare import Run, budget_predictives, budget_scores


def test_total_variation_and_agreement_by_hand():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4]])
    q = np.array([[0.5, 0.3, 0.2], [0.1, 0.3, 0.6]])
    # ½(0.2 + 0.1 + 0.1) = 0.2 and ½(0 + 0.2 + 0.2) = 0.2; top classes 0/0 agree, 1/2 do not
    assert total_variation(p, q) == pytest.approx(0.2)
    assert agreement(p, q) == pytest.approx(0.5)
    s = predictive_scores(p, np.array([0, 2]))
    assert s["loglik"] == pytest.approx(np.mean(np.log([0.7, 0.4])))
    assert s["accuracy"] == pytest.approx(0.5)
    # leading axes (chains, budgets) are kept
    assert total_variation(np.stack([p, q]), q).tolist() == pytest.approx([0.2, 0.0])


def test_a_reference_refuses_predictives_of_another_shape(tmp_path):
    ref = PredictiveReference(np.full((4, 3), 1 / 3), np.full((2, 4, 3), 1 / 3), np.zeros(4, dtype=int),
                              {"name": "toy"})
    with pytest.raises(ValueError, match=r"3 test points × 3 classes but the reference 'toy' has 4 × 3"):
        ref.total_variation(np.full((3, 3), 1 / 3))
    with pytest.raises(ValueError, match="4 test points × 10 classes"):
        ref.agreement(np.full((4, 10), 0.1))
    ref.save(tmp_path / "toy.npz")
    back = PredictiveReference.load(tmp_path / "toy.npz")
    np.testing.assert_allclose(back.probs, ref.probs, atol=1e-3)
    assert back.meta == {"name": "toy"}
    (tmp_path / "bad.npz").write_bytes(b"not a reference")
    with pytest.raises(ValueError, match="not a predictive reference file"):
        PredictiveReference.load(tmp_path / "bad.npz")


def test_load_reference_refuses_another_posterior():
    with pytest.raises(ValueError, match="no shipped reference for 'digits-h16"):
        load_reference(DigitsBNN(hidden=16))
    name = DigitsBNN().name
    if name not in available_references():
        pytest.skip("the T = 1 reference is not built")
    # same name (width, N, T) but another prior: refused, naming what differs
    with pytest.raises(ValueError, match="prior_std"):
        load_reference(DigitsBNN(prior_std=1.0))


@pytest.mark.parametrize("name", available_references())
def test_shipped_references_are_valid(name):
    """Each shipped reference matches its posterior's test set and passed its own checks when it was made."""
    ref = load_reference(name)
    problem = DigitsBNN(**ref.meta["problem"])
    assert problem.name == name
    labels = problem.data()[3].numpy()
    np.testing.assert_array_equal(ref.labels, labels)
    np.testing.assert_allclose(ref.probs.sum(-1), 1, atol=5e-3)  # float16 storage
    np.testing.assert_allclose(ref.chain_probs.mean(0), ref.probs, atol=2e-3)
    assert ref.meta["rhat_test_loglik"] < 1.05 and ref.meta["divergences"] == 0
    assert ref.meta["tv_halves"] < 0.02
    assert 0.9 < ref.meta["test_accuracy"] <= 1


def test_the_flat_parameterization_is_the_models():
    """The reference samples a flat θ through DigitsBNN.logits; the SG samplers the nn.Module: same function."""
    problem = DigitsBNN(hidden=8, num_train=100)
    x, y, xt, _ = problem.data()
    torch.manual_seed(0)
    model = problem.model()
    theta = problem.flatten(model)
    assert theta.numel() == problem.num_params
    torch.testing.assert_close(problem.logits(theta, xt), model(xt))
    stacked = torch.stack([theta, 2 * theta])
    torch.testing.assert_close(problem.logits(stacked, xt)[0], model(xt))
    # −U = Σ log p(y|x,θ) + log N(θ; 0, σ²) up to the prior's constant
    expected = -len(x) * F.cross_entropy(model(x), y) - sum((p**2).sum() for p in model.parameters()) / (2 * 0.25)
    torch.testing.assert_close(problem.log_density(x, y)(theta), expected)
    assert len(x) == 100 and torch.bincount(y).min() >= 9  # stratified subsample


def test_budget_windows_average_the_second_half():
    """After b passes the predictive is the mean of the draws with passes in (b/2, b]."""
    passes = np.arange(1, 9, dtype=float)  # draws at 1, 2, ..., 8 passes
    probs = np.zeros((8, 1, 2))
    probs[:, 0, 0] = passes / 10
    probs[:, 0, 1] = 1 - passes / 10
    run = Run("SGLD", 1e-3, 0, probs, passes, passes * 0.5, float("nan"), 4.0)
    means, seconds = budget_predictives(run, [2, 4, 8, 9])
    assert means[0, 0, 0] == pytest.approx(0.2)  # draw at 2 (1 is not > 1)
    assert means[1, 0, 0] == pytest.approx(np.mean([0.3, 0.4]))
    assert means[2, 0, 0] == pytest.approx(np.mean([0.5, 0.6, 0.7, 0.8]))
    assert np.isnan(means[3]).all() and np.isnan(seconds[3])  # past the run's end
    assert seconds[:3].tolist() == [1.0, 2.0, 4.0]
    ref = PredictiveReference(np.array([[0.8, 0.2]]), np.array([[[0.8, 0.2]]]), np.array([0]))
    tv = budget_scores(run, ref, [2, 4, 8, 9])["tv"]
    assert tv[:3] == pytest.approx([0.6, 0.45, 0.15]) and np.isnan(tv[3])
