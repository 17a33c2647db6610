"""Every ```python block of README.md runs (issue 16.2), so the snippets cannot rot.

Snippets that use data or a model the user brings run after a documented preamble (`PREAMBLE`): the names a
snippet leaves to the reader (``model``, ``X``/``Y``, ``x``/``y``, ``x_test``/``y_test``, ``N``, ``B``, ``idx``,
``w``, and ``engine`` after a backward pass) are defined on small random data: an MLP 64-32-10 and 256 examples
(``x, y`` are ``X, Y``: the sample snippet's data, and one batch of all 256 for the per-example snippets). Nothing
else is added: a snippet that forgets an import fails. The one change the test makes to a snippet's text is to
shorten `vr_mcmc.sample`'s run (``num_warmup=500, num_samples=1000`` -> 20 and 40 steps) so that the suite stays
short; it fails if that text is no longer there to shorten.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"

# The names README snippets take from the reader, on small data. `engine` comes after one backward pass, as the
# gradient-table snippet expects (it calls engine.collect()).
PREAMBLE = """
import torch, torch.nn.functional as F
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
X, Y = torch.randn(256, 64), torch.randint(0, 10, (256,))
x, y = X, Y                      # the data of the sample snippet, the batch of the per-example ones
N = B = len(X)
x_test, y_test = torch.randn(50, 64), torch.randint(0, 10, (50,))
idx, w = torch.arange(B), torch.randn(B)
"""
WITH_ENGINE = """
from vr_mcmc.per_example import PerExampleGradients as _PEG
engine = _PEG(model)
F.cross_entropy(model(x), y).backward()
"""
SHORTER = {"num_warmup=500, num_samples=1000": "num_warmup=20, num_samples=40"}


def snippets() -> list:
    text = README.read_text()
    out = []
    heading = "top"
    for match in re.finditer(r"^(#+ [^\n]*)$|^```python\n(.*?)^```", text, re.S | re.M):
        if match.group(1):
            heading = match.group(1).lstrip("# ").strip()
            continue
        line = text[: match.start()].count("\n") + 1
        out.append(pytest.param(match.group(2), id=f"line{line}-{re.sub(r'[^A-Za-z0-9]+', '_', heading)[:40]}"))
    return out


SNIPPETS = snippets()


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 7


@pytest.mark.parametrize("code", SNIPPETS)
def test_readme_snippet_runs(code, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)  # snippets may write (e.g. checkpoint="runs/mlp")
    for long, short in SHORTER.items():
        if "vr_mcmc.sample(" in code:
            assert long in code, f"the test shortens `{long}` in the sample snippet; update SHORTER"
            code = code.replace(long, short)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        namespace: dict = {"__name__": "readme_snippet"}
        exec(compile(PREAMBLE, "<preamble>", "exec"), namespace)
        if "engine.collect()" in code and "engine =" not in code:
            exec(compile(WITH_ENGINE, "<preamble: engine>", "exec"), namespace)
        # names the snippet uses are the preamble's or its own; the imports must be the snippet's
        user = {k: namespace[k] for k in ("model", "X", "Y", "N", "B", "x", "y", "x_test", "y_test", "idx", "w",
                                          "engine") if k in namespace}
        scope = {"__name__": "readme_snippet", **user}
        exec(compile(code, "<README snippet>", "exec"), scope)
    finally:
        torch.set_num_threads(threads)
