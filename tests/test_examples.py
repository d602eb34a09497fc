"""The examples run end to end on tiny shards generated here, as a user would run them."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

from .data.test_loader import make_shards

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_own_training_loop_caches_reference_and_trains(tmp_path):
    shards = make_shards(tmp_path, 2, 12)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, str(EXAMPLES / "own_training_loop.py"), str(tmp_path)]
    command += ["--steps", "3", "--batch-size", "4", "--filter-ratio", "0.5", "--log-every", "1"]
    proc = subprocess.run([*command, "--device", "cpu"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sidecars = sorted(p.name for p in tmp_path.glob("*.example-reference.json"))
    assert sidecars == [f"{Path(s).stem}.example-reference.json" for s in shards]
    losses = [float(x) for x in re.findall(r"loss (\S+)", proc.stdout)]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), proc.stdout
    scores = [float(x) for x in re.findall(r"chosen (\S+),", proc.stdout)]
    assert len(scores) == 3 and all(math.isfinite(x) for x in scores), proc.stdout
