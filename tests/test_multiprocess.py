"""Two processes, one global 8-device mesh: ``jax.distributed`` on this machine.

Each process runs ``multiprocess_run.py`` with 4 host devices; they meet through
a coordinator on 127.0.0.1 and CPU collectives (gloo), train ``adamax(...)``
with the state split over the global data axis, and each writes its result.
Both must equal a single-process run. The processes are bounded in time and
killed on the way out, whatever happens.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import tolerance

from adamax_optax import _grouping, adamax, finalize_variable_values

SCRIPT = pathlib.Path(__file__).with_name("multiprocess_run.py")
TIMEOUT_S = 240

sys.path.insert(0, str(SCRIPT.parent))
from multiprocess_run import OPTIONS, STACK_FROM, problem  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def single_process() -> tuple[dict, dict]:
    params, grads = problem()
    tx = adamax(**OPTIONS)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(p)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for g in grads:
        p, state = step(p, state, g)
    return p, finalize_variable_values(p, state)


def test_two_processes_train_like_one(tmp_path, monkeypatch):
    port = free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    outs = [tmp_path / f"process_{i}.npz" for i in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), str(i), str(port), str(outs[i])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for process in processes:
            logs.append(process.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, log in zip(processes, logs, strict=True):
        assert process.returncode == 0, log[-3000:]

    monkeypatch.setattr(_grouping, "MIN_SHARED", STACK_FROM)  # as the processes
    params, ema = single_process()
    for out in outs:
        result = np.load(out)
        for name, reference in (("params", params), ("ema", ema)):
            for key, value in reference.items():
                ours, ref = result[f"{name}/{key}"], np.asarray(value)
                error = np.max(np.abs(ours - ref))
                assert error <= tolerance(ref), (name, key, error)
