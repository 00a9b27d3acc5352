"""Small-argument series used where a difference of nearly equal numbers would cancel.

Each is exact to fp32 rounding (and to ~1e-10 relative in fp64) on the stated range; callers switch to
the closed form outside it, where the closed form no longer cancels. Per element in full_kl's forward,
the series is its largest cost (the kernel is issue-bound on an H100/H200: `tune_rows.py --sass`).
"""

import math

import triton
import triton.language as tl

_LN2 = 0.6931471805599453
SERIES_D = tl.constexpr(0.5)  # |d| below this: expm1 / k3 by series
SERIES_T = tl.constexpr(0.5 / _LN2)  # the same range for t = d / ln 2 (`k3_series_base2`)
SERIES_EPS = tl.constexpr(0.1)  # |eps| below this: eps - log1p(eps) by series


# c_n = (-1)^n / n!: the Taylor coefficients of exp(-d), for Horner's rule (one FMA a term)
_C = [(-1) ** n / math.factorial(n) for n in range(12)]
C2, C3, C4, C5, C6, C7, C8, C9, C10, C11 = (tl.constexpr(c) for c in _C[2:])
# fp32: the degree-5 minimax polynomial of f(d) = k3(d) / d^2 on [-0.5, 0.5] in relative error (Remez
# exchange in fp64 against the Taylor series to d^31): max |p/f - 1| = 2.4e-8, under fp32's unit roundoff
# (6e-8). Evaluated in fp32 (Horner without FMA, 400,001 points) k3's relative error is at most 2.0e-7,
# mean 4.3e-8; degree 6 (6.7e-10) gives 1.7e-7 and 3.6e-8 for one more FMA per element in full_kl's
# issue-bound forward. Taylor would need degree 8 for 4.8e-8.
_P = [
    0.5000000120139756,
    -0.1666666545583808,
    0.04166579594169331,
    -0.00833345217228753,
    0.001398199736512758,
    -0.00019875629296399496,
]
P0, P1, P2, P3, P4, P5 = (tl.constexpr(c) for c in _P)
# The same two polynomials in t = d / ln 2 (base-2 units: full_kl's log-ratios are exp2 arguments), divided by
# t: k3(t ln 2) / t = t ln2^2 f(t ln 2), coefficients P_k ln2^(k+2) and c_n ln2^n (the same approximation, its
# coefficients rounded once more)
B0, B1, B2, B3, B4, B5 = (tl.constexpr(c * _LN2 ** (k + 2)) for k, c in enumerate(_P))
T2, T3, T4, T5, T6, T7, T8, T9, T10, T11 = (tl.constexpr(c * _LN2**n) for n, c in enumerate(_C) if n >= 2)


@triton.jit
def k3_series(d):
    """d - 1 + exp(-d) = d^2 f(d) for |d| < 0.5. fp32: f by minimax (5 FMAs, relative error 2.4e-8);
    fp64 (the oracle and gradcheck path): Taylor to d^11 (9 FMAs, 4.6e-12)."""
    if d.dtype == tl.float64:
        r = C10 + d * C11
        r = C9 + d * r
        r = C8 + d * r
        r = C7 + d * r
        r = C6 + d * r
        r = C5 + d * r
        r = C4 + d * r
        r = C3 + d * r
        r = C2 + d * r
    else:
        r = P4 + d * P5
        r = P3 + d * r
        r = P2 + d * r
        r = P1 + d * r
        r = P0 + d * r
    return (d * d) * r


@triton.jit
def k3_series_base2(t):
    """k3(t ln 2) / t for |t| < SERIES_T, so that p k3(d) = (p t) k3_series_base2(t) with d = t ln 2: one
    multiplication fewer than k3_series(d) where p t is needed anyway. fp32: 5 FMAs and a multiplication
    (the minimax polynomial above); fp64: Taylor to t^11."""
    if t.dtype == tl.float64:
        r = T10 + t * T11
        r = T9 + t * r
        r = T8 + t * r
        r = T7 + t * r
        r = T6 + t * r
        r = T5 + t * r
        r = T4 + t * r
        r = T3 + t * r
        r = T2 + t * r
    else:
        r = B4 + t * B5
        r = B3 + t * r
        r = B2 + t * r
        r = B1 + t * r
        r = B0 + t * r
    return t * r


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
