"""Small-argument series used where a difference of nearly equal numbers would cancel.

Each is exact to fp32 rounding (and to ~1e-10 relative in fp64) on the stated range; callers switch to
the closed form outside it, where the closed form no longer cancels.
"""

import triton
import triton.language as tl

SERIES_D = tl.constexpr(0.5)  # |d| below this: expm1 / k3 by series
SERIES_EPS = tl.constexpr(0.1)  # |eps| below this: eps - log1p(eps) by series


# c_n = (-1)^n / n!: the Taylor coefficients of exp(-d), for Horner's rule (one FMA a term)
C2, C3, C4 = tl.constexpr(1.0 / 2), tl.constexpr(-1.0 / 6), tl.constexpr(1.0 / 24)
C5, C6, C7 = tl.constexpr(-1.0 / 120), tl.constexpr(1.0 / 720), tl.constexpr(-1.0 / 5040)
C8, C9, C10 = tl.constexpr(1.0 / 40320), tl.constexpr(-1.0 / 362880), tl.constexpr(1.0 / 3628800)
C11 = tl.constexpr(-1.0 / 39916800)


@triton.jit
def k3_series(d):
    """d - 1 + exp(-d) = sum_{n>=2} c_n d^n  for |d| < 0.5 (Taylor to d^11, Horner: 9 FMAs)."""
    r = C10 + d * C11
    r = C9 + d * r
    r = C8 + d * r
    r = C7 + d * r
    r = C6 + d * r
    r = C5 + d * r
    r = C4 + d * r
    r = C3 + d * r
    r = C2 + d * r
    return (d * d) * r


@triton.jit
def expm1_neg_series(d):
    """exp(-d) - 1 = k3(d) - d for |d| < 0.5: the one series, and well-conditioned (|k3(d)| < 0.3 |d| there)."""
    return k3_series(d) - d


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
