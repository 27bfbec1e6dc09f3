"""One of two processes of a multi-process run (see test_multiprocess.py).

``python multiprocess_run.py PROCESS_ID PORT OUT``: joins the other process
through ``jax.distributed`` (coordinator on 127.0.0.1, CPU collectives over
gloo, 4 host devices each), trains ``adamax(...)`` over one global 8-device mesh
with the parameters replicated and the state split by ``state_shardings``, and
writes the final parameters and EMA to ``OUT`` (a ``.npz``). The same code runs
on GPU or TPU pods, one process per host, without the first three settings.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adamax_optax import (
    _grouping,
    adamax,
    finalize_variable_values,
    get_iterations,
    state_shardings,
)

OPTIONS = dict(
    learning_rate=0.05,
    weight_decay=0.01,
    global_clipnorm=1.0,
    use_ema=True,
    ema_momentum=0.9,
    gradient_accumulation_steps=2,
)
# "bias" and "gain" share a shape: the optimizer keeps their state stacked
# where shapes are stacked from 2 leaves (`STACK_FROM`), so that they stand for
# a deep model's hundreds.
STACK_FROM = 2
SHAPES = {"kernel": (16, 8), "bias": (8,), "gain": (8,)}
STEPS = 6


def problem() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """The same parameters and gradients in every process (seeded)."""
    rng = np.random.default_rng(7)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [
        {k: (3 * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}
        for _ in range(STEPS)
    ]
    return params, grads


def main(process_id: int, port: int, out: str) -> None:
    # Set here, not at import: the test imports this module into its own
    # process, where a module-level setting would reach every later test.
    _grouping.MIN_SHARED = STACK_FROM
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=120,
    )
    assert jax.process_count() == 2 and jax.device_count() == 8
    assert jax.local_device_count() == 4
    mesh = jax.make_mesh((8,), ("data",))
    replicated = NamedSharding(mesh, P())

    def global_array(value: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(
            value.shape, replicated, lambda index: value[index]
        )

    params, grads = problem()
    tx = adamax(**OPTIONS)
    p = {k: global_array(v) for k, v in params.items()}
    shardings = state_shardings(jax.eval_shape(tx.init, p), mesh, "data")
    state = jax.jit(tx.init, out_shardings=shardings)(p)
    m = state["accumulate"].inner_state["adamax"].m
    # The kernel (alone) and the stack of bias and gain, each split 8 ways.
    by_kind = dict(zip(m.stacked(), m.parts, strict=True))
    kernel_m, stack_m = by_kind[False], by_kind[True]
    assert kernel_m.addressable_shards[0].data.shape == (2, 8)  # 16 rows / 8
    assert stack_m.addressable_shards[0].data.shape == (2, 1), stack_m.sharding

    param_sh = {k: replicated for k in SHAPES}

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(
        step,
        in_shardings=(param_sh, shardings, param_sh),
        out_shardings=(param_sh, shardings),
        donate_argnums=(0, 1),
    )
    for g in grads:
        p, state = step(p, state, {k: global_array(v) for k, v in g.items()})
    assert int(get_iterations(state)) == STEPS // 2
    ema = jax.jit(finalize_variable_values, out_shardings=param_sh)(p, state)
    local = lambda tree: {k: np.asarray(v.addressable_data(0)) for k, v in tree.items()}  # noqa: E731
    np.savez(
        out,
        **{f"params/{k}": v for k, v in local(p).items()},
        **{f"ema/{k}": v for k, v in local(ema).items()},
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
