"""The metrics chart in a fresh process: matplotlib loads only when a chart is drawn, and
its first-run notices (font cache, an unusable MPLCONFIGDIR) never reach the log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO

SCRIPT = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
import ganns_async.plots as plots
assert "matplotlib" not in sys.modules, "importing ganns_async.plots loaded matplotlib"
out = plots.write_metrics_plot([{"step": 1, "g_loss": 1.0, "swd": 5.0}], Path(sys.argv[1]), title="run 1")
print("wrote", out.stat().st_size > 1000)
"""


def test_first_chart_with_an_unusable_config_dir_is_silent(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # A folder below a regular file can never be created, even by root: matplotlib falls back
    # to a temporary folder, builds its font cache there, and says so at WARNING.
    env = {**os.environ, "MPLCONFIGDIR": str(blocker / "mpl"),
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONWARNINGS": "default"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "metrics.png")],
                       capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "wrote True"
    assert r.stderr == ""
