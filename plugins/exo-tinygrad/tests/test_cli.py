"""`exo run --prompt` with no model or engine named: the embedded model answers on tinygrad."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

EXO = str(Path(sys.executable).with_name("exo"))


@pytest.mark.skipif(platform.system() != "Linux", reason="tinygrad is the default engine on Linux")
def test_exo_run_answers_paris(tmp_path):
    env = {**os.environ, "EXO_HOME": str(tmp_path / "exo-home")}
    done = subprocess.run(
        [EXO, "run", "--prompt", "What is the capital of France? Answer in one word."],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Paris" in done.stdout, (done.stdout, done.stderr[-3000:])
    assert "tinygrad" in done.stderr  # the node log names the engine it chose
