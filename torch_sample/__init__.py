"""torch_sample: posterior samplers in the style of torch.optim (DESIGN.md §6).

Stochastic-gradient Langevin samplers, each a `torch.optim.Optimizer`: `SGLD`, `SAGALD`,
`SVRGLD`, `SGLDCV` (``temperature=0`` gives SGD, SAGA, SVRG), and the other diffusions `SGHMC`, `PSGLD`,
`SGNHT` (each with any ``estimator=``; cyclical schedules in `torch_sample.schedules`); full-data samplers driven by a
closure: `ULA`, `MALA`, `HMC`, `NUTS`. Priors in `torch_sample.priors`.
"""

from . import priors, schedules
from .closure import ClosureSampler
from .hmc import HMC, leapfrog
from .langevin import DivergenceError, LangevinSampler, langevin_update
from .mala import MALA
from .metropolis import MetropolisSampler
from .nuts import NUTS
from .psgld import PSGLD
from .sagald import SAGALD
from .sghmc import SGHMC
from .sgld import SGLD
from .sgldcv import SGLDCV
from .sgnht import SGNHT
from .svrgld import SVRGLD
from .target import log_density_closure
from .ula import ULA

__all__ = ["HMC", "MALA", "NUTS", "PSGLD", "SAGALD", "SGHMC", "SGLD", "SGLDCV", "SGNHT", "SVRGLD", "ULA",
           "ClosureSampler", "DivergenceError", "LangevinSampler", "MetropolisSampler", "langevin_update", "leapfrog",
           "log_density_closure", "priors", "schedules"]
