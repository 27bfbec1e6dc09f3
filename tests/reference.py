"""An independent NumPy re-implementation of the update rule (docs: semantics).

Written from the documented formulas, not from the package: float64 (complex128
for complex parameters, whose ``|g|`` is the modulus) throughout, plain
loops over a dict of arrays, one object holding all the state. It is the oracle for
the places where we depart from Keras on purpose (EMA under accumulation) and for
closed-form checks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import numpy as np


def _wide(value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    return value.astype(np.complex128 if np.iscomplexobj(value) else np.float64)


class ReferenceAdamax:
    """Keras' Adamax as documented; ``step(grads)`` updates ``self.params``."""

    def __init__(
        self,
        params: dict[str, np.ndarray],
        learning_rate: float | Callable[[int], float] = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        loss_scale_factor: float | None = None,
        gradient_accumulation_steps: int | None = None,
        exclude_from_weight_decay: Iterable[str] = (),
        skip_nonfinite: bool = False,
        skip_norm_above: float | None = None,
        exclude_from_ema: Iterable[str] = (),
    ):
        self.params = {k: _wide(v).copy() for k, v in params.items()}
        self.learning_rate = learning_rate
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon
        self.weight_decay = weight_decay
        self.clipnorm, self.clipvalue = clipnorm, clipvalue
        self.global_clipnorm = global_clipnorm
        self.use_ema, self.ema_momentum = use_ema, ema_momentum
        self.ema_overwrite_frequency = ema_overwrite_frequency
        self.loss_scale_factor = loss_scale_factor
        self.n = gradient_accumulation_steps or 1
        self.skip_nonfinite, self.skip_norm_above = skip_nonfinite, skip_norm_above
        self.skipped = 0  # calls skipped for a bad gradient
        self.group_calls, self.group_weight = 0, 0.0
        patterns = list(exclude_from_weight_decay)
        self.excluded = {
            k for k in params if patterns and re.search("|".join(patterns), k)
        }
        ema_patterns = list(exclude_from_ema)
        self.ema_excluded = {
            k for k in params if ema_patterns and re.search("|".join(ema_patterns), k)
        }
        zeros = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.m = dict(zeros)
        self.u = {k: np.zeros(v.shape) for k, v in self.params.items()}  # real
        self.accumulator = dict(zeros)
        self.ema = {  # no average of an excluded leaf
            k: v.copy() for k, v in self.params.items() if k not in self.ema_excluded
        }
        self.calls = 0  # every call, micro-steps included (Keras' _iterations)
        self.updates = 0  # real updates applied

    def _lr(self) -> float:
        # Keras' micro-step index of the update's last call: k * N + N - 1.
        if callable(self.learning_rate):
            return float(self.learning_rate(self.updates * self.n + self.n - 1))
        return float(self.learning_rate)

    def _is_bad(self, g: dict[str, np.ndarray], weight: float) -> bool:
        values = [*g.values(), np.asarray(weight)]
        if not all(np.all(np.isfinite(v)) for v in values):
            return True
        norm = np.sqrt(sum(np.sum(np.abs(v) ** 2) for v in g.values()))
        return self.skip_norm_above is not None and norm > self.skip_norm_above

    def _clip(self, g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.clipnorm is not None:
            c = self.clipnorm
            return {
                k: v * c / max(np.sqrt(np.sum(np.abs(v) ** 2)), c) for k, v in g.items()
            }
        if self.global_clipnorm is not None:
            c = self.global_clipnorm
            n = np.sqrt(sum(np.sum(np.abs(v) ** 2) for v in g.values()))
            if not np.isfinite(n):
                return {k: np.full_like(v, np.nan) for k, v in g.items()}
            return {k: v * c * min(1 / n, 1 / c) for k, v in g.items()}
        if self.clipvalue is not None:
            c = self.clipvalue
            return {k: np.clip(v, -c, c) for k, v in g.items()}
        return g

    def step(
        self, grads: dict[str, np.ndarray], weight: float = 1.0, flush: bool = False
    ) -> None:
        """One call: ``weight`` weighs the gradient in its group's mean and
        ``flush`` ends the group here (under accumulation)."""
        g = {k: _wide(v) for k, v in grads.items()}
        if self.loss_scale_factor is not None:
            g = {k: v / self.loss_scale_factor for k, v in g.items()}
        if self.skip_nonfinite and self._is_bad(g, weight):
            self.skipped += 1
            return
        lr = self._lr()
        self.calls += 1
        if self.n > 1:
            for k in g:
                self.accumulator[k] = self.accumulator[k] + weight * g[k]
            self.group_calls += 1
            self.group_weight += weight
            if self.group_calls < self.n and not flush:
                return
            total = self.group_weight
            g = {k: v / (total or 1.0) for k, v in self.accumulator.items()}
            self.accumulator = {k: np.zeros_like(v) for k, v in g.items()}
            self.group_calls, self.group_weight = 0, 0.0
            if total == 0:  # a group without weight carries no gradient
                return
        g = self._clip(g)
        t = self.updates + 1
        for k, w in self.params.items():
            if self.weight_decay is not None and k not in self.excluded:
                w = w - w * self.weight_decay * lr
            self.m[k] = self.m[k] + (g[k] - self.m[k]) * (1 - self.beta_1)
            self.u[k] = np.maximum(self.beta_2 * self.u[k], np.abs(g[k]))
            step = lr * self.m[k] / ((1 - self.beta_1**t) * (self.u[k] + self.epsilon))
            self.params[k] = w - step
        if self.use_ema:
            momentum = 0.0 if self.updates == 0 else self.ema_momentum
            for k in self.ema:
                self.ema[k] = momentum * self.ema[k] + (1 - momentum) * self.params[k]
            f = self.ema_overwrite_frequency
            if f is not None and t % f == 0:
                self.params.update({k: v.copy() for k, v in self.ema.items()})
        self.updates += 1

    def final(self) -> dict[str, np.ndarray]:
        """Keras' ``finalize_variable_values``: the average where there is one."""
        if not self.use_ema:
            return dict(self.params)
        return {k: self.ema.get(k, v) for k, v in self.params.items()}
