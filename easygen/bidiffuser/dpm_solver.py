"""DPM-Solver++ (data prediction) for the VP schedule, as UniDiffuser and EasyGen sample with it.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models": the
exponential-integrator update in half log-SNR lambda with the data predictor x0 = (x - sigma_t eps) / alpha_t
(Eq. 9), singlestep updates of order 1-3 (Alg. 1, and DPM-Solver's third-order singlestep, Alg. 2 of Lu et al.
2022a written for data prediction) and the multistep updates of order 2-3 (Alg. 2) with the "dpm_solver"
(midpoint) variant. ``method="fast"`` is the reference code's schedule: with order 3, K = steps // 3 + 1 outer
intervals, all third order except a final second/first order one, so 50 NFE = 16 x 3 + 2; inside an
interval the intermediate points are placed time-uniformly and passed as (r1, r2) in lambda.
Every step shares one t across the batch, so all coefficients are float64 scalars.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from .schedule import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DPMSolverPP:
    """``model_fn(x, t_continuous [B]) -> eps``; the caller feeds the network t * 1000."""

    def __init__(self, model_fn: ModelFn, schedule: NoiseSchedule):
        self.model_fn = model_fn
        self.ns = schedule
        self.nfe = 0

    # Schedule quantities as python floats.
    def _alpha(self, t: float) -> float:
        return float(self.ns.marginal_alpha(t))

    def _sigma(self, t: float) -> float:
        return float(self.ns.marginal_std(t))

    def _lambda(self, t: float) -> float:
        return float(self.ns.marginal_lambda(t))

    def _inv_lambda(self, lamb: float) -> float:
        return float(self.ns.inverse_lambda(lamb))

    def data_prediction(self, x: torch.Tensor, t: float) -> torch.Tensor:
        self.nfe += 1
        t_vec = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        eps = self.model_fn(x, t_vec)
        return (x - self._sigma(t) * eps) / self._alpha(t)

    def time_steps(self, skip_type: str, t_start: float, t_end: float, n: int) -> list[float]:
        if skip_type == "time_uniform":
            return torch.linspace(t_start, t_end, n + 1, dtype=torch.float64).tolist()
        if skip_type == "logSNR":
            lambdas = torch.linspace(self._lambda(t_start), self._lambda(t_end), n + 1, dtype=torch.float64)
            return self.ns.inverse_lambda(lambdas).tolist()
        raise ValueError(f"skip_type must be 'time_uniform' or 'logSNR', got {skip_type!r}")

    # Singlestep updates (s -> t).

    def singlestep_update(
        self,
        x: torch.Tensor,
        s: float,
        t: float,
        order: int,
        r1: float | None = None,
        r2: float | None = None,
    ) -> torch.Tensor:
        lam_s, lam_t = self._lambda(s), self._lambda(t)
        h = lam_t - lam_s
        sig_s, sig_t, a_t = self._sigma(s), self._sigma(t), self._alpha(t)
        phi_1 = math.expm1(-h)
        m_s = self.data_prediction(x, s)
        if order == 1:
            return (sig_t / sig_s) * x - (a_t * phi_1) * m_s
        if order == 2:
            r1 = 0.5 if r1 is None else r1
            s1 = self._inv_lambda(lam_s + r1 * h)
            x_s1 = (self._sigma(s1) / sig_s) * x - (self._alpha(s1) * math.expm1(-r1 * h)) * m_s
            m_s1 = self.data_prediction(x_s1, s1)
            return (sig_t / sig_s) * x - (a_t * phi_1) * m_s - (0.5 / r1) * (a_t * phi_1) * (m_s1 - m_s)
        if order == 3:
            r1 = 1.0 / 3.0 if r1 is None else r1
            r2 = 2.0 / 3.0 if r2 is None else r2
            s1, s2 = self._inv_lambda(lam_s + r1 * h), self._inv_lambda(lam_s + r2 * h)
            phi_11, phi_12 = math.expm1(-r1 * h), math.expm1(-r2 * h)
            phi_22 = math.expm1(-r2 * h) / (r2 * h) + 1.0
            phi_2 = phi_1 / h + 1.0
            x_s1 = (self._sigma(s1) / sig_s) * x - (self._alpha(s1) * phi_11) * m_s
            m_s1 = self.data_prediction(x_s1, s1)
            a_s2 = self._alpha(s2)
            x_s2 = (
                (self._sigma(s2) / sig_s) * x
                - (a_s2 * phi_12) * m_s
                + (r2 / r1) * (a_s2 * phi_22) * (m_s1 - m_s)
            )
            m_s2 = self.data_prediction(x_s2, s2)
            return (sig_t / sig_s) * x - (a_t * phi_1) * m_s + (1.0 / r2) * (a_t * phi_2) * (m_s2 - m_s)
        raise ValueError(f"order must be 1, 2 or 3, got {order}")

    # Multistep update from the last `order` data predictions to t.

    def multistep_update(
        self, x: torch.Tensor, models: list[torch.Tensor], times: list[float], t: float, order: int
    ) -> torch.Tensor:
        lam_0, lam_t = self._lambda(times[-1]), self._lambda(t)
        h = lam_t - lam_0
        sig_0, sig_t, a_t = self._sigma(times[-1]), self._sigma(t), self._alpha(t)
        phi_1 = math.expm1(-h)
        m0 = models[-1]
        x_t = (sig_t / sig_0) * x - (a_t * phi_1) * m0
        if order == 1:
            return x_t
        r0 = (lam_0 - self._lambda(times[-2])) / h
        d1_0 = (1.0 / r0) * (m0 - models[-2])
        if order == 2:
            return x_t - 0.5 * (a_t * phi_1) * d1_0
        if order == 3:
            r1 = (self._lambda(times[-2]) - self._lambda(times[-3])) / h
            d1_1 = (1.0 / r1) * (models[-2] - models[-3])
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            return x_t + (a_t * phi_2) * d1 - (a_t * phi_3) * d2
        raise ValueError(f"order must be 1, 2 or 3, got {order}")

    @staticmethod
    def fast_orders(steps: int, order: int) -> list[int]:
        """Per-interval orders of the reference 'fast' schedule, summing to `steps` function evaluations."""
        if order == 3:
            k = steps // 3 + 1
            if steps % 3 == 0:
                return [3] * (k - 2) + [2, 1]
            if steps % 3 == 1:
                return [3] * (k - 1) + [1]
            return [3] * (k - 1) + [2]
        if order == 2:
            return [2] * (steps // 2) + [1] * (steps % 2)
        if order == 1:
            return [1] * steps
        raise ValueError(f"order must be 1, 2 or 3, got {order}")

    @torch.no_grad()
    def sample(
        self,
        x: torch.Tensor,
        steps: int = 50,
        order: int = 3,
        method: Literal["fast", "multistep"] = "fast",
        skip_type: Literal["time_uniform", "logSNR"] = "time_uniform",
        t_start: float = 1.0,
        t_end: float = 1e-3,
        lower_order_final: bool = True,
    ) -> torch.Tensor:
        """Integrate the probability-flow ODE from t_start to t_end with `steps` model evaluations (fast) or
        `steps` steps (multistep, steps evaluations as well)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if method == "fast":
            orders = self.fast_orders(steps, order)
            outer = self.time_steps(skip_type, t_start, t_end, len(orders))
            for i, o in enumerate(orders):
                s, t = outer[i], outer[i + 1]
                inner = self.time_steps(skip_type, s, t, o)
                lam = [self._lambda(u) for u in inner]
                h = lam[-1] - lam[0]
                r1 = (lam[1] - lam[0]) / h if o >= 2 else None
                r2 = (lam[2] - lam[0]) / h if o >= 3 else None
                x = self.singlestep_update(x, s, t, o, r1=r1, r2=r2)
            return x
        if method == "multistep":
            if order not in (1, 2, 3):
                raise ValueError(f"order must be 1, 2 or 3, got {order}")
            ts = self.time_steps(skip_type, t_start, t_end, steps)
            models = [self.data_prediction(x, ts[0])]
            times = [ts[0]]
            for step in range(1, steps + 1):
                # Warm up with lower orders; optionally finish with lower orders too (more stable for few steps).
                step_order = min(order, step)
                if lower_order_final:
                    step_order = min(step_order, steps + 1 - step)
                x = self.multistep_update(x, models, times, ts[step], step_order)
                times = (times + [ts[step]])[-order:]
                if step < steps:
                    models = (models + [self.data_prediction(x, ts[step])])[-order:]
            return x
        raise ValueError(f"method must be 'fast' or 'multistep', got {method!r}")


def dpm_solver_sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x: torch.Tensor,
    steps: int = 50,
    order: int = 3,
    method: Literal["fast", "multistep"] = "fast",
    **kwargs,
) -> torch.Tensor:
    return DPMSolverPP(model_fn, schedule).sample(x, steps=steps, order=order, method=method, **kwargs)
