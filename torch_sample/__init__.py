"""torch_sample: posterior samplers in the style of torch.optim (DESIGN.md §6).

The samplers (SGLD, SAGA-LD, SVRG-LD, ULA, MALA, HMC) arrive with the next issues; they build
on `vr_mcmc.per_example`.
"""

__all__: list[str] = []
