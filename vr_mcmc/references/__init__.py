"""Reference posterior predictives shipped with the package (see `vr_mcmc.predictive.load_reference`).

Each ``<name>.npz`` was made by ``python benchmarks/bnn_reference.py`` (long full-batch HMC); its
``meta`` records the command, run time and the reference's own validity checks.
"""
