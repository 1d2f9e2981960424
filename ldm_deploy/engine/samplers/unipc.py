"""UniPC (Zhao et al. 2023), as diffusers' UniPCMultistepScheduler with its defaults: solver_order 2,
predict_x0, solver_type "bh2", lower_order_final, the corrector at every step, final sigma zero;
optionally with Karras sigmas. Same timesteps and sigmas as DPM++ 2M (dpmpp_2m.py), VP space.

With lambda = -log(s), h the gap in lambda to the next step, B = e^-h - 1 and m the x0 predictions:
- the predictor (UniP) steps from the corrected x^c_k:
      x_{k+1} = (sigma_{k+1} / sigma_k) x^c_k - alpha_{k+1} B m_k  [ - alpha_{k+1} B / 2 (m_{k-1} - m_k) / r ]
  (order 2 after the first step, r = (lambda_{k-1} - lambda_k) / h; order 1 first and last);
- the corrector (UniC), once m_k is known, redoes the last step with it:
      x^c_k = (sigma_k / sigma_{k-1}) x^c_{k-1} - alpha_k B m_{k-1} - alpha_k B (rho . D)
  with D the order's differences of m_k, m_{k-1}, m_{k-2} and rho from a small linear system.
Both are linear in x^c_{k-1} and the m's, and x_k itself is the predictor's output from x^c_{k-1},
so x^c_{k-1} need not be kept: one step is linear in x_k, m_k, m_{k-1} and m_{k-2}, which the
U-Net step has as latents, its x0, state and state2 (columns c_x, c_0, c_p, c_pp). Each update is
composed here as coefficients over those four.

That takes the latents a step gets to be exactly what the step before made. Inpainting with a
text-to-image U-Net replaces them where the mask is 0 with the image's own (pipeline.py), which
keeps this exact only because masks are 0 or 1 (as diffusers cuts them): the kept part is
replaced again after every step. A soft mask would need the corrected latents kept as a state.
"""

from __future__ import annotations

import numpy as np

from ldm_deploy.engine.samplers.dpmpp_2m import timesteps_and_sigmas
from ldm_deploy.engine.samplers.schedule import Walk, table, x0_coefficients

# Coefficient vectors over (x_k, m_k, m_{k-1}, m_{k-2}).
X, M0, M1, M2 = np.eye(4)


def walk(schedule, steps: int, start: int, karras: bool = False, exponential: bool = False,
         beta: bool = False) -> Walk:
    """Coefficients for steps start..steps-1 of a `steps`-step UniPC walk."""
    t, s = timesteps_and_sigmas(schedule, steps, karras, exponential, beta)
    alpha = 1 / np.sqrt(s**2 + 1)
    sigma_vp = s * alpha
    p_x, p_m = x0_coefficients(schedule.prediction_type, alpha[:-1], sigma_vp[:-1])
    with np.errstate(divide="ignore"):
        lam = -np.log(s)  # +inf at the final sigma 0
    rows = np.zeros((steps, 4))  # c_x, c_0, c_p, c_pp of each step
    order_before = 0  # the predictor order of the step before (0: none, the walk's first)
    # Two steps at one noise level (h = 0: only near num_train_timesteps steps) divide by zero;
    # plan() rejects the non-finite rows with the advice.
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in range(start, steps):
            if order_before:  # the corrected x^c_k, from x_k and what made it
                x_c = corrected(k, order_before, lam, alpha, sigma_vp)
            else:
                x_c = X
            order = 1 if k == start or k == steps - 1 else 2  # warm-up; lower_order_final
            rows[k] = predicted(k, order, x_c, lam, alpha, sigma_vp)
            order_before = order
    c_x, c_0, c_p, c_pp = rows.T
    out = table(steps, timestep=t, c_in=1.0, p_x=p_x, p_m=p_m, c_x=c_x, c_0=c_0, c_p=c_p, c_pp=c_pp)
    return Walk(out[start:], 1.0, np.stack([alpha[:-1], sigma_vp[:-1]], 1)[start:])


def predicted(k: int, order: int, x_c: np.ndarray, lam, alpha, sigma_vp) -> np.ndarray:
    """x_{k+1} from x^c_k (a coefficient vector) by UniP of `order`."""
    if not np.isfinite(lam[k + 1]):  # the last step, to sigma 0: h = inf, B = -1
        return M0.copy()  # x_{k+1} = m_k
    h = lam[k + 1] - lam[k]
    b = np.expm1(-h)
    out = sigma_vp[k + 1] / sigma_vp[k] * x_c - alpha[k + 1] * b * M0
    if order == 2:
        r = (lam[k - 1] - lam[k]) / h
        out = out - alpha[k + 1] * b * 0.5 * (M1 - M0) / r
    return out


def corrected(k: int, order: int, lam, alpha, sigma_vp) -> np.ndarray:
    """x^c_k by UniC of `order` (the predictor order that made x_k), as a vector over
    (x_k, m_k, m_{k-1}, m_{k-2}). x_k = P(x^c_{k-1}) gives (sigma_k / sigma_{k-1}) x^c_{k-1}
    = x_k - (P's other terms), all in the basis shifted one step: m_{k-1} -> M1, m_{k-2} -> M2."""
    h = lam[k] - lam[k - 1]
    b = np.expm1(-h)
    # The predictor from k - 1, without its x^c_{k-1} term, in this step's basis.
    rest = -alpha[k] * b * M1
    if order == 2:
        r_p = (lam[k - 2] - lam[k - 1]) / h
        rest = rest - alpha[k] * b * 0.5 * (M2 - M1) / r_p
    scaled_last = X - rest  # (sigma_k / sigma_{k-1}) x^c_{k-1}
    if order == 1:
        correction = 0.5 * (M0 - M1)
    else:
        r = (lam[k - 2] - lam[k - 1]) / h
        rho = np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]), b_vector(h))
        correction = rho[0] * (M2 - M1) / r + rho[1] * (M0 - M1)
    return scaled_last - alpha[k] * b * M1 - alpha[k] * b * correction


def b_vector(h: float) -> np.ndarray:
    """UniC's right-hand side for order 2 with B(h) = e^-h - 1 ("bh2"), predicting x0 (hh = -h)."""
    hh = -h
    b_h = np.expm1(hh)
    phi = b_h / hh - 1  # h phi_2
    first = phi / b_h
    phi = phi / hh - 0.5  # h phi_3, scaled
    return np.array([first, phi * 2 / b_h])
