"""Progress without a terminal (issue 16.7): `vr_mcmc.sample` prints one-line progress when stderr is not a TTY
(a log file, a notebook, a batch job) or the terminal is too narrow for a bar."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vr_mcmc.chains import runner

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^chain (\d): step (\d+)/(\d+) \((\d+)%, (warmup|\d+ draws)\), [\d.]+ steps/s, "
                  r"step size [\d.e-]+, (ETA [\dhmins ]+|done)$")

SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
import chain_job
from vr_mcmc.chains import runner
runner.LineProgress.min_gap_s = {gap}
torch.set_num_threads(1)
chain_job.run(None, "sgld", num_samples=200, num_warmup=50, thin=2, progress=True)
"""


def _run(gap: float) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=str(ROOT / "tests"), gap=gap)], env=env,
                         capture_output=True, text=True, timeout=300)  # stderr is a pipe, not a TTY
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr and "\x1b" not in out.stderr  # no bar redraws, no escape codes
    return [line for line in out.stderr.splitlines() if line.startswith("chain ")]


def test_progress_lines_when_stderr_is_a_pipe():
    """Every 10% of a chain (the time gap lowered to 0 so the short run shows them), one line each, in the
    stated format; the last says done with all 100 draws (thin 2)."""
    lines = _run(0.0)
    for chain in (0, 1):
        mine = [LINE.match(line) for line in lines if line.startswith(f"chain {chain}:")]
        assert all(mine), lines
        assert [int(m.group(4)) for m in mine] == list(range(10, 101, 10)), lines
        assert mine[0].group(5) == "warmup" and mine[-1].group(5) == "100 draws" and mine[-1].group(6) == "done"
        assert "ETA" in mine[0].group(6)


class _Clock:
    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


@pytest.mark.parametrize("tick, total, expected", [
    (1e-3, 500, 1),               # a half-second chain: only its final line
    (0.011, 1000, 10),            # 11 s: every 10%
    (1.0, 1000, 100),             # 1000 s: every 10 s (100 lines), the 10% marks fall on them
    (0.6, 20, 10),                # 12 s: a 10% mark each 1.2 s
    (0.3, 20, 5),                 # 6 s: 10% marks closer than 1 s apart are skipped
])
def test_line_rate(tick, total, expected):
    """A line each 10% or 10 s, whichever first, at most one a second, plus the final one (simulated clock)."""
    out = io.StringIO()
    line = runner.LineProgress(0, total, 0, stream=out, clock=_Clock(tick))  # one clock read a step
    for _ in range(total):
        line.update(1)
    line.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == expected, lines
    assert lines[-1].endswith("done") and f"step {total}/{total}" in lines[-1]


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("columns, bar", [(0, False), (20, False), (120, True)])
def test_narrow_terminals_get_lines_not_bars(monkeypatch, columns, bar):
    """A terminal narrower than 40 columns (or of width 0) gets progress lines; a wide one a tqdm bar."""
    monkeypatch.setattr(sys, "stderr", _FakeTerminal())
    monkeypatch.setattr(runner, "_terminal_columns", lambda: columns)
    spec = {"progress": True, "num_warmup": 5, "thin": 1, "parallel": False}
    progress = runner._progress(spec, 0, 10, 0)
    try:
        assert isinstance(progress, runner.LineProgress) != bar
    finally:
        progress.close()
    assert runner._progress({**spec, "progress": False}, 0, 10, 0) is None


def test_line_progress_format_and_eta():
    out = io.StringIO()
    line = runner.LineProgress(3, 1000, 0, stream=out)
    line.num_warmup, line.min_gap_s = 100, 0.0
    line.set_postfix_str("accept 0.81, step size 0.05")
    line.update(100)
    text = out.getvalue().strip()
    assert text.startswith("chain 3: step 100/1000 (10%, warmup),") and "accept 0.81, step size 0.05" in text
    assert runner._duration(75) == "1 min 15 s" and runner._duration(3 * 3600 + 120) == "3 h 02 min"
