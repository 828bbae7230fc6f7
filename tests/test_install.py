"""A built wheel (not only the editable install) ships archkit.blocks and archkit.kernels,
and the metric table (archkit/metrics.yaml)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_the_mapped_packages(tmp_path: Path) -> None:
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-q", "-w", str(wheels), str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = wheels.glob("archkit-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        check=True, capture_output=True,
    )
    probe = (
        "import archkit, archkit.blocks, archkit.kernels, archkit.tasks, archkit.searching\n"
        "import archkit.pretrained.weights\n"
        "from archkit.registry import BLOCKS, RULES\n"
        "from archkit.metrics import METRICS\n"
        "print(archkit.__file__); print(archkit.blocks.__file__); print(archkit.kernels.__file__)\n"
        "print(','.join(BLOCKS.names())); print(','.join(RULES.names())); print(len(METRICS))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            cwd=tmp_path, env=env, check=True)
    lines = result.stdout.splitlines()
    for path in lines[:3]:
        assert path.startswith(str(target)), path
    assert lines[3] == "attention,gated_delta,hebbian,jet,mamba2,mlp"
    assert {"delta", "gated_delta", "hebbian"} <= set(lines[4].split(","))
    assert int(lines[5]) > 20
    find = "import importlib.util as u; s = u.find_spec('kernels'); print(s and s.origin)"
    origin = subprocess.run([sys.executable, "-c", find], capture_output=True, text=True,
                            cwd=tmp_path, env=env, check=True).stdout.strip()
    assert str(target) not in origin and str(ROOT) not in origin  # `kernels` is not ours
