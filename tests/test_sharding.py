"""Sharded parameters and ZeRO-1 state on an 8-device host mesh, in fresh
processes."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys


def test_sharded_update_matches_single_device():
    script = pathlib.Path(__file__).with_name("sharded_run.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SHARDED OK" in result.stdout
    assert "EXPLICIT OK" in result.stdout


def test_zero_stage_1_state_sharding():
    script = pathlib.Path(__file__).with_name("zero_run.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ZERO OK" in result.stdout
