"""The example a user copies (issue 20): `examples/cnn_digits.py --quick` runs end to end: a CNN with BatchNorm
replaced, SAGA-LD and cSGHMC through `vr_mcmc.sample` with ``keep_params``, `PosteriorEnsemble` scores that agree
with the same functions applied to the ensemble's own predictive, and a reliability diagram."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

import vr_mcmc
from vr_mcmc.ensemble import brier_score, expected_calibration_error

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cnn_digits.py"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # conftest.py
    yield


def test_cnn_digits_quick(tmp_path, capsys):
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("cnn_digits", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = example.make_cnn()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) == 2
    rows = example.main(["--quick", "--out", str(tmp_path), "--quiet"])
    assert [r[0] for r in rows] == ["SGD (MAP)", "SAGA-LD", "cSGHMC"]
    assert (tmp_path / "reliability.png").stat().st_size > 1000
    _, _, xt, yt = example.load_data()
    for name, (label, draws, scores, _) in zip(("saga_ld", "csghmc"), rows[1:]):
        ensemble = vr_mcmc.PosteriorEnsemble(tmp_path / name, example.make_cnn())
        assert len(ensemble) == draws > 0, label
        probs = ensemble.predict(xt)
        assert scores["ece"] == pytest.approx(expected_calibration_error(probs, yt), abs=1e-12)
        assert scores["brier"] == pytest.approx(brier_score(probs, yt), abs=1e-12)
        assert scores["accuracy"] == pytest.approx(float((probs.argmax(-1) == yt).double().mean()))
        assert math.isfinite(scores["log_likelihood"])
    assert "reliability diagram" in capsys.readouterr().out
