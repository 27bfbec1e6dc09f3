"""Sharded parameters and ZeRO-1 state on an 8-device host mesh, in fresh
processes."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys


def run_on_8_devices(script: str) -> str:
    """Runs ``script`` (beside this file) with 8 host devices; its stdout."""
    # Beside the other pytest worker, 8 host devices on 2 cores may wait
    # longer than XLA's 40 s for each other in a collective: not a hang.
    flags = (
        "--xla_force_host_platform_device_count=8 "
        "--xla_cpu_collective_call_terminate_timeout_seconds=600 "
        "--xla_cpu_collective_timeout_seconds=600"
    )
    env = {**os.environ, "XLA_FLAGS": flags}
    result = subprocess.run(
        [sys.executable, str(pathlib.Path(__file__).with_name(script))],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_sharded_update_matches_single_device():
    out = run_on_8_devices("sharded_run.py")
    assert "SHARDED OK" in out and "EXPLICIT OK" in out


def test_zero_stage_1_state_sharding():
    assert "ZERO OK" in run_on_8_devices("zero_run.py")
