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
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
