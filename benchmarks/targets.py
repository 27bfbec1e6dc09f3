"""``python benchmarks/bench.py --targets``: the gating measurements.

First the in-place table (:func:`in_place_rows`): the footprint of one donated
step of each composition under each gating, leaf-sized temporaries, leaf copies
and bytes accessed (:mod:`footprint`). Then the targets (:func:`target_rows`): at
one size, micro-step and update step over their floors for each gating,
compositions over ``adamax()``, the defaults over ``optax.adamax``, a weighted
step over an unweighted one and ``skip_nonfinite`` over none, each timed
interleaved with what it is compared to and called met, missed or inconclusive
against its limit.
"""

from __future__ import annotations

from typing import Any

import footprint
import jax.numpy as jnp
import optax
from cases import ACCUMULATION, micro_step_of
from footprint import donated, donated_weighted
from harness import Case, interleaved_ratio, make_tree, over_floor
from peers import FULL_OPTIONS, optax_chain

from adamax_optax import (
    accumulate_gradients,
    adamax,
    decoupled_weight_decay,
    dynamic_loss_scale,
    keras_global_clipnorm,
    named_chain,
    parameter_ema,
    scale_by_keras_adamax,
    scale_by_keras_learning_rate,
)


def _blocks() -> Any:
    """``adamax(**FULL_OPTIONS)``'s blocks, composed by hand."""
    return named_chain(
        ("global_clipnorm", keras_global_clipnorm(1.0)),
        ("adamax", scale_by_keras_adamax()),
        ("weight_decay", decoupled_weight_decay(1e-3)),
        ("learning_rate", scale_by_keras_learning_rate(1e-3)),
        ("ema", parameter_ema(0.99)),
    )


def in_place_rows() -> list[dict[str, Any]]:
    """Leaf-sized temporaries and leaf copies of one donated step, per gating:
    what XLA's buffer assignment holds besides parameters, state and gradients
    (over the two leaves of :data:`footprint.SHAPES`)."""
    accumulation = dict(gradient_accumulation_steps=ACCUMULATION)
    compositions = {
        "adamax(N=4)": lambda g: adamax(**accumulation, gating=g),
        "adamax(N=4, clip, decay, EMA)": lambda g: adamax(
            **accumulation, **FULL_OPTIONS, gating=g
        ),
        "adamax(N=4, clip, decay, EMA, dynamic_loss_scale)": lambda g: adamax(
            **accumulation, **FULL_OPTIONS, dynamic_loss_scale=True, gating=g
        ),
        "accumulate_gradients(named_chain(blocks), 4)": lambda g: accumulate_gradients(
            _blocks(), ACCUMULATION, gating=g
        ),
        "dynamic_loss_scale(accumulate_gradients(...))": lambda g: dynamic_loss_scale(
            accumulate_gradients(_blocks(), ACCUMULATION), gating=g
        ),
        "adamax(dynamic_loss_scale), no accumulation": lambda g: adamax(
            dynamic_loss_scale=True, gating=g
        ),
        "adamax(N=4, clip, decay, EMA, skip_nonfinite)": lambda g: adamax(
            **accumulation, **FULL_OPTIONS, skip_nonfinite=True, gating=g
        ),
        "adamax(N=4, ..., skip_nonfinite, dynamic_loss_scale)": lambda g: adamax(
            **accumulation,
            **FULL_OPTIONS,
            skip_nonfinite=True,
            dynamic_loss_scale=True,
            gating=g,
        ),
        "adamax(N=4, ..., skip_nonfinite, loss_scale_factor)": lambda g: adamax(
            **accumulation,
            **FULL_OPTIONS,
            skip_nonfinite=True,
            loss_scale_factor=3.0,
            gating=g,
        ),
        "adamax(), no accumulation": lambda g: adamax(gating=g),
        "adamax(skip_nonfinite), no accumulation": lambda g: adamax(
            skip_nonfinite=True, gating=g
        ),
        "optax.MultiSteps(optax_chain(), 4)": lambda g: optax.MultiSteps(
            optax_chain(), ACCUMULATION
        ).gradient_transformation(),
    }
    rows = []
    print(
        f"{'composition':52s} temporaries / copies, in units of 512 KiB;"
        " bytes accessed (XLA's cost model, every branch of a gate counted), in"
        " gradients"
    )
    for name, make in compositions.items():
        row: dict[str, Any] = dict(composition=name)
        for gating in ("loop", "cond", "where"):
            row[gating] = footprint.in_place(footprint.compile_step(make(gating)))
        rows.append(row)
        cells = "  ".join(
            f"{g} {row[g]['temporaries']:4.1f} / {row[g]['copies']}"
            for g in ("loop", "cond", "where")
        )
        print(f"{name:52s} {cells}  bytes (cond) {row['cond']['bytes_accessed']:4.1f}")
    return rows


def target_rows(total: int, leaves: int, pairs: int) -> list[dict[str, Any]]:
    """The gating targets, each timed interleaved with what it is compared to."""
    grads = make_tree(total, leaves, jnp.float32, 0.5)
    steps = ACCUMULATION

    def case(name, tx, words=0, phase=None):
        params = make_tree(total, leaves, jnp.float32, 1.0)
        phase_of = micro_step_of if phase is not None else None
        state = (params, tx.init(params))
        return Case(name, words, donated(tx), state, grads, phase_of, phase)

    rows = []

    def compare(target, name, a, b, limit):
        if b is None:
            result = over_floor(a, total, pairs)
            against = f"{a.words}-word floor"
        else:
            result = interleaved_ratio(a, b, pairs)
            against = b.name
        # Met when three quarters of the pairs are within the limit, missed when
        # three quarters are above it; otherwise the quartiles straddle it.
        met = True if result["q75"] <= limit else None
        if result["q25"] > limit:
            met = False
        rows.append(
            dict(
                target=target,
                case=name,
                against=against,
                limit=limit,
                met=met,
                **result,
            )
        )
        a.state = None
        if b is not None:
            b.state = None
        spread = f"[{result['q25']:.2f}, {result['q75']:.2f}]"
        verdict = {True: "met", False: "NOT met"}.get(
            met, "inconclusive: the quartiles straddle the limit"
        )
        print(
            f"{name:52s} {against:32s} {result['ratio']:5.2f} {spread:13s} "
            f"<= {limit:<4} {verdict}"
        )

    print(f"{'case':52s} {'against':32s} {'ratio':>5s} {'quartiles':13s} limit")
    for gating in (None, "loop", "cond", "where"):
        label = gating or "default"
        for phase, words, limit, what in (
            (0, 5, 1.3, "micro-step"),
            (steps - 1, 9, 1.6, "update step"),
        ):
            tx = adamax(gradient_accumulation_steps=steps, gating=gating)
            name = f"adamax(N={steps}, gating={label}) {what}"
            compare(
                f"{what} over floor", name, case(name, tx, words, phase), None, limit
            )
    for phase, what in ((0, "micro-step"), (steps - 1, "update step")):
        compositions = {
            "accumulate(named_chain(blocks))": (
                accumulate_gradients(_blocks(), steps),
                adamax(gradient_accumulation_steps=steps, **FULL_OPTIONS),
            ),
            "dynamic_loss_scale(accumulate(blocks))": (
                dynamic_loss_scale(accumulate_gradients(_blocks(), steps)),
                adamax(
                    gradient_accumulation_steps=steps,
                    dynamic_loss_scale=True,
                    **FULL_OPTIONS,
                ),
            ),
        }
        for name, (composed, ours) in compositions.items():
            compare(
                "composition over adamax()",
                f"{name} {what}",
                case(name, composed, phase=phase),
                case("adamax() with the same options", ours, phase=phase),
                1.1,
            )
    compare(
        "defaults over optax.adamax",
        "adamax() defaults",
        case("adamax()", adamax()),
        case("optax.adamax", optax.adamax(1e-3)),
        1.05,
    )
    accumulate = dict(gradient_accumulation_steps=steps)
    for phase, what in ((0, "micro-step"), (steps - 1, "update step")):
        tx = adamax(**accumulate)
        weighted = case(f"adamax(N={steps}, weight=w) {what}", tx, phase=phase)
        weighted.step = donated_weighted(tx)
        weighted.grads = (grads, jnp.float32(3.0))
        compare(
            "weight over none",
            weighted.name,
            weighted,
            case(f"adamax(N={steps})", tx, phase=phase),
            1.1,
        )
    # One more read of the gradient: 8/7 of the defaults' 7 words, 6/5 of a
    # micro-step's 5, 7/6 of a micro-step under dynamic loss scaling (whose own
    # check reads the gradient once).
    scaled = dict(accumulate, dynamic_loss_scale=True)
    for name, options, phase, limit in (
        ("adamax(skip_nonfinite)", {}, None, 1.15),
        (f"adamax(N={steps}, skip_nonfinite) micro-step", accumulate, 0, 1.2),
        (
            f"adamax(N={steps}, skip_nonfinite, dynamic_loss_scale) micro-step",
            scaled,
            0,
            1.17,
        ),
    ):
        compare(
            "skip_nonfinite over none",
            name,
            case(name, adamax(skip_nonfinite=True, **options), phase=phase),
            case("without it", adamax(**options), phase=phase),
            limit,
        )
    return rows
