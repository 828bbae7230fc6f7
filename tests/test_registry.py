"""Registry: duplicate names fail; third-party entries arrive through entry points."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from archkit.registry import BLOCKS, Registry, RegistryError


def test_duplicate_names_are_an_error() -> None:
    registry = Registry("widget")
    registry.register("a", description="first")(object())
    with pytest.raises(RegistryError, match="already registered"):
        registry.register("a")(object())


def test_unknown_name_lists_the_registered_ones() -> None:
    with pytest.raises(RegistryError, match="registered: attention, gated_delta") as caught:
        BLOCKS.get("gated_deltaa")
    assert "Did you mean 'gated_delta'" in str(caught.value)


def test_plugins_register_through_the_entry_point_group(tmp_path: Path) -> None:
    (tmp_path / "my_plugin.py").write_text(textwrap.dedent('''
        from archkit.blocks.mlp import MLP, MLPConfig
        from archkit.registry import register_block

        @register_block("wide_mlp", config=MLPConfig, description="a plugin's block")
        class WideMLP(MLP):
            pass
    '''))
    info = tmp_path / "my_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[archkit.plugins]\nmy_plugin = my_plugin\n")
    spec = tmp_path / "s.yaml"
    spec.write_text("name: p\nmodel: {vocab_size: 8, d_model: 16, layers: [wide_mlp]}\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    listing = subprocess.run([sys.executable, "-m", "archkit.cli", "blocks"], env=env,
                             capture_output=True, text=True, check=True)
    assert "wide_mlp" in listing.stdout and "a plugin's block" in listing.stdout
    built = subprocess.run([sys.executable, "-m", "archkit.cli", "build", str(spec), "--json"],
                           env=env, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    assert '"block": "wide_mlp"' in built.stdout
