"""DPM-Solver++ (data prediction) for the VP schedule, with UniDiffuser's "DPM-Solver-fast" time points.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models": the
exponential-integrator update in half log-SNR lambda with the data predictor x0 = (x - sigma_t eps) / alpha_t
(Eq. 9); singlestep updates of order 1 (the DDIM step), 2 (Alg. 1) and 3 (the third-order singlestep of
Lu et al. 2022a, Alg. 2, written for data prediction, "dpm_solver" variant), as UniDiffuser's
dpm_solver_pp.py (``DPM_Solver(..., predict_x0=True)``) implements them.

``method="fast"`` follows ``DPM_Solver.sample(method='fast')`` of UniDiffuser's dpm_solver_pp.py, which
``sample_multi_v1.py`` calls with ``steps=50, eps=1/N, T=1``:

- the per-step orders come from its ``get_time_steps_for_dpm_solver_fast``: with order 3 and
  K = steps // 3 + 1, ``[3] * (K - 2) + [2, 1]`` if steps % 3 == 0, ``[3] * (K - 1) + [1]`` if
  steps % 3 == 1, ``[3] * (K - 1) + [2]`` if steps % 3 == 2 (50 NFE: 16 x 3 + 2; 12 NFE: 3, 3, 3, 2, 1);
  with order 2, ``[2] * (steps // 2)`` plus a final ``1`` when steps is odd;
- the time points are ONE grid of steps + 1 points from t_start to t_end (``get_time_steps(skip_type, T,
  eps, N=steps)``: uniform in t for "time_uniform", uniform in lambda for "logSNR"), walked in groups: a
  step of order k goes from point i to point i + k, and its intermediate evaluations sit at points i + 1
  and i + 2 (passed to the update as r1, r2 = (lambda_{i+1} - lambda_i) / h, (lambda_{i+2} - lambda_i) / h).
  The K + 1 points that ``get_time_steps_for_dpm_solver_fast`` also returns are discarded by ``sample``
  (``orders, _ = ...``); only its orders are used.

Every function evaluation lands on a grid point, so ``steps`` is the number of network evaluations.
Order 1 is not accepted by the reference's fast path (it raises); here it means ``steps`` first-order steps
(DDIM) on the same grid. Every step shares one t across the batch, so all coefficients are float64 scalars.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from .schedule import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SKIP_TYPES = ("time_uniform", "logSNR")


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
        """n + 1 points from t_start to t_end (``get_time_steps`` of UniDiffuser's dpm_solver_pp.py)."""
        if skip_type == "time_uniform":
            return torch.linspace(t_start, t_end, n + 1, dtype=torch.float64).tolist()
        if skip_type == "logSNR":
            lambdas = torch.linspace(self._lambda(t_start), self._lambda(t_end), n + 1, dtype=torch.float64)
            return self.ns.inverse_lambda(lambdas).tolist()
        raise ValueError(f"skip_type must be one of {SKIP_TYPES}, got {skip_type!r}")

    @staticmethod
    def fast_orders(steps: int, order: int) -> list[int]:
        """Per-step orders of DPM-Solver-fast (``get_time_steps_for_dpm_solver_fast`` of UniDiffuser's
        dpm_solver_pp.py); they sum to ``steps`` function evaluations."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
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

    def fast_schedule(
        self,
        steps: int,
        order: int = 3,
        skip_type: str = "time_uniform",
        t_start: float = 1.0,
        t_end: float = 1e-3,
    ) -> tuple[list[int], list[float]]:
        """(orders, the steps + 1 grid points) of DPM-Solver-fast; step j goes from point sum(orders[:j]) to
        point sum(orders[:j + 1])."""
        orders = self.fast_orders(steps, order)
        return orders, self.time_steps(skip_type, t_start, t_end, steps)

    # Singlestep update (s -> t).

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

    @torch.no_grad()
    def sample(
        self,
        x: torch.Tensor,
        steps: int = 50,
        order: int = 3,
        method: Literal["fast"] = "fast",
        skip_type: Literal["time_uniform", "logSNR"] = "time_uniform",
        t_start: float = 1.0,
        t_end: float = 1e-3,
    ) -> torch.Tensor:
        """Integrate the probability-flow ODE from t_start to t_end with ``steps`` model evaluations."""
        if method != "fast":
            raise ValueError(
                f"sampler method must be 'fast' (DPM-Solver-fast, the sampler of UniDiffuser's "
                f"sample_multi_v1.py), got {method!r}"
            )
        if skip_type not in SKIP_TYPES:
            raise ValueError(f"skip_type must be one of {SKIP_TYPES}, got {skip_type!r}")
        orders, ts = self.fast_schedule(steps, order, skip_type, t_start, t_end)
        i = 0
        for o in orders:
            lam_i = self._lambda(ts[i])
            h = self._lambda(ts[i + o]) - lam_i
            r1 = (self._lambda(ts[i + 1]) - lam_i) / h if o >= 2 else None
            r2 = (self._lambda(ts[i + 2]) - lam_i) / h if o >= 3 else None
            x = self.singlestep_update(x, ts[i], ts[i + o], o, r1=r1, r2=r2)
            i += o
        return x


def dpm_solver_sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x: torch.Tensor,
    steps: int = 50,
    order: int = 3,
    method: Literal["fast"] = "fast",
    **kwargs,
) -> torch.Tensor:
    return DPMSolverPP(model_fn, schedule).sample(x, steps=steps, order=order, method=method, **kwargs)
