"""Small-argument series used where a difference of nearly equal numbers would cancel.

Each is exact to fp32 rounding (and to ~1e-10 relative in fp64) on the stated range; callers switch to
the closed form outside it, where the closed form no longer cancels.
"""

import triton
import triton.language as tl

SERIES_D = tl.constexpr(0.5)  # |d| below this: expm1 / k3 by series
SERIES_EPS = tl.constexpr(0.1)  # |eps| below this: eps - log1p(eps) by series


@triton.jit
def expm1_neg_series(d):
    """exp(-d) - 1 for |d| < 0.5 (Taylor to d^10)."""
    r = 1.0 - d * (1.0 / 10.0)
    r = 1.0 - d * (1.0 / 9.0) * r
    r = 1.0 - d * (1.0 / 8.0) * r
    r = 1.0 - d * (1.0 / 7.0) * r
    r = 1.0 - d * (1.0 / 6.0) * r
    r = 1.0 - d * (1.0 / 5.0) * r
    r = 1.0 - d * (1.0 / 4.0) * r
    r = 1.0 - d * (1.0 / 3.0) * r
    r = 1.0 - d * (1.0 / 2.0) * r
    return -d * r


@triton.jit
def k3_series(d):
    """d - 1 + exp(-d) = sum_{n>=2} (-d)^n / n!  for |d| < 0.5 (Taylor to d^11)."""
    r = 1.0 - d * (1.0 / 11.0)
    r = 1.0 - d * (1.0 / 10.0) * r
    r = 1.0 - d * (1.0 / 9.0) * r
    r = 1.0 - d * (1.0 / 8.0) * r
    r = 1.0 - d * (1.0 / 7.0) * r
    r = 1.0 - d * (1.0 / 6.0) * r
    r = 1.0 - d * (1.0 / 5.0) * r
    r = 1.0 - d * (1.0 / 4.0) * r
    r = 1.0 - d * (1.0 / 3.0) * r
    return 0.5 * d * d * r


@triton.jit
def h_series(e):
    """e - log(1 + e) = sum_{n>=2} (-1)^n e^n / n  for |e| < 0.1 (to e^12)."""
    r = 1.0 / 11.0 - e * (1.0 / 12.0)
    r = 1.0 / 10.0 - e * r
    r = 1.0 / 9.0 - e * r
    r = 1.0 / 8.0 - e * r
    r = 1.0 / 7.0 - e * r
    r = 1.0 / 6.0 - e * r
    r = 1.0 / 5.0 - e * r
    r = 1.0 / 4.0 - e * r
    r = 1.0 / 3.0 - e * r
    r = 1.0 / 2.0 - e * r
    return e * e * r


@triton.jit
def expm1_neg(d):
    """exp(-d) - 1 without cancellation for small |d|."""
    return tl.where(tl.abs(d) < SERIES_D, expm1_neg_series(d), tl.exp(-d) - 1.0)


@triton.jit
def k3(d):
    """Schulman's k3 = (r - 1) - log r with log r = -d, i.e. exp(-d) - 1 + d, without cancellation."""
    return tl.where(tl.abs(d) < SERIES_D, k3_series(d), tl.exp(-d) - 1.0 + d)


@triton.jit
def h_log1p(e):
    """e - log(1 + e) without cancellation for small |e|."""
    return tl.where(tl.abs(e) < SERIES_EPS, h_series(e), e - tl.log(1.0 + e))
