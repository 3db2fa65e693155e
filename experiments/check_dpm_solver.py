"""DPM-Solver-fast: easygen's sampler against UniDiffuser's rule, before and after the time-point fix.

    python experiments/check_dpm_solver.py

Prints (1) the max relative difference max|x - x_ref| / max|x_ref| between a sample and the reference at
10, 12, 20, 25 and 50 NFE, where the reference is the plain re-derivation of UniDiffuser's
``DPM_Solver.sample(method='fast')`` in tests/test_dpm_solver.py (one grid of steps + 1 points, walked in
groups of the orders). "old" is the placement easygen used before (K = len(orders) equal outer intervals,
each subdivided into `order` parts); "new" is ``DPMSolverPP.sample``. Two model functions: a smooth toy
eps(x, t) and the tiny U-ViT (random weights, seed 0) as an i2t sampler with guidance 7 and a fixed
unconditional noise. (2) The observed convergence order (slope of log error vs log NFE) on data ~ N(0.7,
0.5^2), where the exact x0-prediction and the exact ODE solution are known, for the third-order solver and
for a control with every third-order step degraded to second order.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easygen.bidiffuser.dpm_solver import DPMSolverPP  # noqa: E402
from easygen.bidiffuser.uvit import UViT, UViTConfig  # noqa: E402
from tests import test_dpm_solver as ref  # noqa: E402

NS = ref.NS
NFES = [10, 12, 20, 25, 50]


def old_fast_sample(model_fn, x, steps, skip_type):
    """The placement easygen used before: K equal outer intervals, each split into `order` equal parts."""
    solver = DPMSolverPP(model_fn, NS)
    orders = solver.fast_orders(steps, 3)
    outer = solver.time_steps(skip_type, 1.0, 1e-3, len(orders))
    for i, o in enumerate(orders):
        s, t = outer[i], outer[i + 1]
        lam = [solver._lambda(u) for u in solver.time_steps(skip_type, s, t, o)]
        h = lam[-1] - lam[0]
        r1 = (lam[1] - lam[0]) / h if o >= 2 else None
        r2 = (lam[2] - lam[0]) / h if o >= 3 else None
        x = solver.singlestep_update(x, s, t, o, r1=r1, r2=r2)
    return x


def tiny_uvit_i2t():
    torch.manual_seed(0)
    cfg = UViTConfig.tiny()
    uvit = UViT(cfg).eval()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, cfg.img_size, cfg.img_size, generator=g)
    clip = torch.randn(2, 1, cfg.clip_img_dim, generator=g)
    z_n, clip_n = torch.randn(z.shape, generator=g), torch.randn(clip.shape, generator=g)
    y_T = torch.randn(2, cfg.num_text_tokens, cfg.text_dim, generator=g)
    zeros = torch.zeros(2)

    @torch.no_grad()
    def eps(x, t):
        t_text = t.float() * 1000
        y = x.float()
        out = uvit(
            torch.cat([z, z_n]),
            torch.cat([clip, clip_n]),
            torch.cat([y, y]),
            torch.cat([zeros, zeros + 1000]),
            torch.cat([t_text, t_text]),
            1,
        )[2]
        cond, uncond = out.chunk(2)
        return (cond + 7.0 * (cond - uncond)).to(x.dtype)

    return eps, y_T


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def main():
    x_toy = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    uvit_eps, y_T = tiny_uvit_i2t()
    print("max relative difference to UniDiffuser's DPM-Solver-fast rule (old placement | new)")
    print(f"{'model':<22}{'skip_type':<14}" + "".join(f"{n:>22}" for n in NFES))
    for name, fn, x in [
        ("toy eps, float64", ref._smooth_eps, x_toy),
        ("tiny U-ViT i2t, cfg 7", uvit_eps, y_T),
    ]:
        for skip in ("time_uniform", "logSNR"):
            cells = []
            for n in NFES:
                want = ref.reference_fast_sample(fn, x.double(), n, skip)
                old = old_fast_sample(fn, x, n, skip)
                new = DPMSolverPP(fn, NS).sample(x, steps=n, skip_type=skip)
                cells.append(f"{rel(old, want):.1e} | {rel(new, want):.1e}")
            print(f"{name:<22}{skip:<14}" + "".join(f"{c:>22}" for c in cells))

    print(
        "\nobserved convergence order on data ~ N(0.7, 0.5^2), logSNR steps, slope of log max error vs log NFE"
    )
    for window in ([50, 80, 110, 140], [80, 110, 152, 200], [110, 152, 200, 290]):
        ref.ORDER_STEPS = window
        print(
            f"  NFE {window}: third order {ref._observed_order():.2f}, "
            f"third degraded to second (control) {ref._observed_order(ref._ThirdAsSecond):.2f}"
        )
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = ref._gaussian_exact(x)
    print(
        "  max error, reference setting (time_uniform, 1 -> 1e-3):",
        ", ".join(
            f"{n} NFE {(DPMSolverPP(ref._gaussian_eps, NS).sample(x, steps=n) - exact).abs().max().item():.2e}"
            for n in (11, 20, 50, 200)
        ),
    )


if __name__ == "__main__":
    main()
