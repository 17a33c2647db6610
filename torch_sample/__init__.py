"""torch_sample: posterior samplers in the style of torch.optim (DESIGN.md §6).

Stochastic-gradient Langevin samplers, each a `torch.optim.Optimizer`: `SGLD`, `SAGALD`,
`SVRGLD`, `SGLDCV` (``temperature=0`` gives SGD, SAGA, SVRG). Priors in `torch_sample.priors`.
"""

from . import priors
from .langevin import LangevinSampler, langevin_update
from .sagald import SAGALD
from .sgld import SGLD
from .sgldcv import SGLDCV
from .svrgld import SVRGLD

__all__ = ["SAGALD", "SGLD", "SGLDCV", "SVRGLD", "LangevinSampler", "langevin_update", "priors"]
