r"""The solvable quadratic model of "Lazy vs hasty" §4 (George, Lajoie, Baratin, TMLR 2022).

Model. Inputs X (n, d), labels y (n,), loss ℓ(θ) = ½‖Xθ − y‖². With the SVD
X = Σ_λ m_λ u_λ v_λᵀ (m_λ ≥ 0 the singular values, μ_λ := m_λ², v_λ completed to an
orthonormal basis of R^d, μ_λ = 0 on the null space of X) the parameters are

    θ(w) = ½ Σ_{λ=1}^{d} w_λ² v_λ,      i.e.  θ_λ := v_λᵀθ = ½ w_λ²,

and w follows the gradient flow ẇ = −∇_w ℓ(θ(w)) from w0. Writing y_λ := u_λᵀy,
θ*_λ := y_λ / m_λ and ỹ_λ := m_λ y_λ = μ_λ θ*_λ (the v_λ component of Xᵀy):

    ∂ℓ/∂θ_λ = μ_λ (θ_λ − θ*_λ),   ẇ_λ = −w_λ μ_λ (θ_λ − θ*_λ),
    θ̇_λ = w_λ ẇ_λ = −μ_λ w_λ² (θ_λ − θ*_λ) = −2 μ_λ θ_λ (θ_λ − θ*_λ).         (eq. 11)

This logistic equation has the solution (Prop. 1, eq. 12), valid for every sign of θ*_λ
and for θ0_λ ≥ 0 (θ0_λ = 0 is a fixed point):

    θ_λ(t) = θ0_λ θ*_λ / (θ0_λ − e^{−2ỹ_λ t}(θ0_λ − θ*_λ))      (θ*_λ ≠ 0)
           = θ0_λ / (1 + 2 μ_λ θ0_λ t)                             (θ*_λ = 0).

Both branches are evaluated here through one cancellation-free form,
θ_λ(t) = θ0_λ / (e^{−a t} + 2 μ_λ θ0_λ t · φ(a t)), a = 2ỹ_λ, φ(z) = (1 − e^{−z})/z, φ(0) = 1.

Linearized ("lazy") regime. The first-order expansion of θ(w) around w0,
θ̄(w) = θ0 + Σ_λ w0_λ (w_λ − w0_λ) v_λ, trained by the same gradient flow, gives
ẇ_λ = −w0_λ μ_λ (θ̄_λ − θ*_λ), hence

    θ̄̇_λ = −μ_λ (w0_λ)² (θ̄_λ − θ*_λ) = −2 μ_λ θ0_λ (θ̄_λ − θ*_λ),
    θ̄_λ(t) = θ*_λ + e^{−2 μ_λ θ0_λ t} (θ0_λ − θ*_λ).

**Finding on eq. 13.** The paper prints the rate μ_λ θ0_λ; the correct rate is
2 μ_λ θ0_λ = μ_λ (w0_λ)² (the same factor 2 that appears as 2ỹ_λ in eq. 12, and the rate
σ μ_i the paper itself states for Example 1, where θ0 = σ/2). The paper's own
linearization θ̄ = Σ w_λ w0_λ v_λ differs from ours by a constant and has the same rate.
tests/test_theory.py checks this against a numerical ODE solve (the printed constant fails).
Consequences for §4.3: the ε-convergence times (eq. 14, |θ_λ − θ*_λ| = ε, ε, θ0 ≪ θ*) are

    t_λ(ε) ≈ log(θ*_λ² / (ε θ0_λ)) / (2 ỹ_λ),     t_λ^lin(ε) ≈ log(θ*_λ / ε) / (2 μ_λ θ0_λ),

(printed: log(θ*/(ε θ0))/ỹ and log(θ*/ε)/(μ θ0)), and at t_λ(ε), with θ0 = σ θ̃0,

    θ_λ'(t_λ) ≈ θ*_λ' θ̃0_λ' / (θ̃0_λ' + θ*_λ' [ε θ̃0_λ / θ*_λ²]^{r} σ^{r − 1}),  r = ỹ_λ'/ỹ_λ,

which tends to θ*_λ' if ỹ_λ' > ỹ_λ and to 0 if ỹ_λ' < ỹ_λ: the limits printed in eq. 15
hold, but the printed intermediate (exponent 2ỹ_λ'/ỹ_λ − 1, from the printed t_λ) would
put the threshold at ỹ_λ/2.

Basis convention. Eq. (9) depends on the basis (v_λ), which the SVD fixes only up to
signs and rotations inside a repeated singular value. fasttangent fixes it so that the
model is a function of (X, y) alone: inside each group of equal nonzero singular values
the basis is rotated so that y projects onto its first vector only, then signs are
flipped so that y_λ ≥ 0 (the paper's "without loss of generality"). Null-space modes
(μ_λ = 0) keep LAPACK's basis; they never move. Use :func:`quadratic_modes` to get the
basis that ``w0`` refers to.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.linalg

REGIMES = ("nonlinear", "linear")


class QuadraticModes(NamedTuple):
    """The mode basis of the quadratic model for data (X, y).

    mu: (d,) μ_λ = m_λ², non-increasing; 0 for the null-space modes (λ ≥ rank).
    V: (d, d) orthogonal, column λ is v_λ.
    U: (n, k) column λ is u_λ for the k = min(n, d) first modes (X v_λ = m_λ u_λ).
    y_modes: (d,) y_λ = u_λᵀ y ≥ 0 (0 for λ ≥ rank).
    theta_star: (d,) θ*_λ = y_λ / m_λ (0 for null-space modes, which stay at θ0_λ).
    y_tilde: (d,) ỹ_λ = m_λ y_λ = (V ᵀ Xᵀ y)_λ.
    rank: number of modes with μ_λ > 0.
    """

    mu: np.ndarray
    V: np.ndarray
    U: np.ndarray
    y_modes: np.ndarray
    theta_star: np.ndarray
    y_tilde: np.ndarray
    rank: int


def quadratic_modes(X, y, *, rtol: float = 1e-9) -> QuadraticModes:
    """SVD basis of X with y aligned inside repeated singular values and y_λ ≥ 0.

    X: (n, d), y: (n,). Singular values within ``rtol``·m_max of each other count as equal;
    those below max(n, d)·eps·m_max count as zero (numpy's rank rule).
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"expected X (n, d) and y (n,), got X {X.shape} and y {y.shape}; "
                         "pass one scalar label per row of X")
    n, d = X.shape
    U_full, s, Vt = np.linalg.svd(X, full_matrices=True)
    k = min(n, d)
    U, V = U_full[:, :k].copy(), Vt.T.copy()
    s_max = s[0] if k else 0.0
    rank = int(np.sum(s > max(n, d) * np.finfo(float).eps * s_max))

    # rotate each block of equal singular values so that y lies along its first vector
    start = 0
    while start < rank:
        stop = start + 1
        while stop < rank and s[start] - s[stop] <= rtol * s_max:
            stop += 1
        if stop - start > 1:
            c = U[:, start:stop].T @ y
            if np.linalg.norm(c) > 0:
                Q, _ = scipy.linalg.qr(c[:, None])  # Q[:, 0] = ±c/‖c‖, Q orthogonal
                U[:, start:stop] = U[:, start:stop] @ Q
                V[:, start:stop] = V[:, start:stop] @ Q
        start = stop

    y_modes = np.zeros(d)
    y_modes[:rank] = U[:, :rank].T @ y
    flip = y_modes < 0
    U[:, flip[:k]] *= -1
    V[:, flip] *= -1
    y_modes = np.abs(y_modes)
    y_modes[rank:] = 0.0

    mu = np.zeros(d)
    mu[:rank] = s[:rank] ** 2
    m = np.sqrt(mu)
    theta_star = np.zeros(d)
    theta_star[:rank] = y_modes[:rank] / m[:rank]
    return QuadraticModes(mu, V, U, y_modes, theta_star, m * y_modes, rank)


def mode_flow(theta0, theta_star, mu, times, regime: str = "nonlinear") -> np.ndarray:
    """θ_λ(t) per mode, closed form (eq. 12 nonlinear; corrected eq. 13 linear).

    theta0: (k,) θ0_λ = ½ (w0_λ)² ≥ 0; theta_star: (k,) any sign; mu: (k,) ≥ 0; times: (T,).
    Returns (T, k). Nonlinear: θ̇ = −2μθ(θ − θ*); linear: θ̇ = −2μθ0(θ − θ*).
    """
    _check_regime(regime)
    theta0, theta_star, mu = (np.asarray(a, dtype=np.float64) for a in (theta0, theta_star, mu))
    if np.any(theta0 < 0):
        raise ValueError("theta0 = ½ w0² must be ≥ 0; pass ½·w0**2, not w0")
    t = np.asarray(times, dtype=np.float64)[:, None]
    if regime == "linear":
        return theta_star + np.exp(-2 * mu * theta0 * t) * (theta0 - theta_star)
    a_t = 2 * mu * theta_star * t  # 2 ỹ_λ t
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        phi = np.where(a_t == 0, 1.0, -np.expm1(-a_t) / np.where(a_t == 0, 1.0, a_t))
        denom = np.exp(-a_t) + 2 * mu * theta0 * t * phi
        out = theta0 / denom
    # θ* < 0 drives θ to 0 super-exponentially; e^{−at} overflows to inf there
    return np.where(np.isfinite(denom), out, 0.0)


def quadratic_flow(X, y, w0, times, regime: str = "nonlinear", *, modes: QuadraticModes | None = None) -> np.ndarray:
    """θ(t) of the quadratic model trained by gradient flow on ½‖Xθ − y‖², closed form.

    X: (n, d) inputs; y: (n,) labels; times: (T,).
    w0: (d,) initial w in the mode basis: w0[λ] is the coefficient of the right-singular
        vector v_λ = ``quadratic_modes(X, y).V[:, λ]``, for all d modes λ (modes ordered by
        decreasing singular value; λ ≥ rank are the null-space modes of X, which stay at
        ½ w0[λ]² v_λ). θ0 = ½ Σ_λ w0[λ]² v_λ.
    regime: "nonlinear" (gradient flow in w, eq. 12) or "linear" (gradient flow of the
        first-order linearization θ0 + Σ w0_λ (w_λ − w0_λ) v_λ, rate 2μ_λθ0_λ).
    modes: a precomputed ``quadratic_modes(X, y)``.
    Returns θ(t): (T, d) in the original coordinates.
    """
    modes = quadratic_modes(X, y) if modes is None else modes
    w0 = np.asarray(w0, dtype=np.float64)
    if w0.shape != modes.mu.shape:
        raise ValueError(f"w0 must have one entry per mode, shape {modes.mu.shape}, got {w0.shape}")
    theta_modes = mode_flow(0.5 * w0**2, modes.theta_star, modes.mu, times, regime)
    return theta_modes @ modes.V.T


def per_example_squared_error(X, y, thetas) -> np.ndarray:
    """(x_iᵀθ(t) − y_i)². X: (n, d), y: (n,), thetas: (T, d) -> (T, n)."""
    return (np.asarray(thetas) @ np.asarray(X).T - np.asarray(y)) ** 2


def convergence_time(theta0, theta_star, mu, eps, regime: str = "nonlinear", *, asymptotic: bool = False) -> np.ndarray:
    """ε-convergence time t_λ(ε): first t with |θ_λ(t) − θ*_λ| = ε (eq. 14, corrected).

    theta0, theta_star, mu: (k,) with θ*_λ > 0, μ_λ > 0, θ0_λ > 0. Exact inversion of the
    closed forms by default (0 where |θ0 − θ*| ≤ ε); ``asymptotic=True`` gives the ε, θ0 ≪ θ*
    forms log(θ*²/(εθ0))/(2ỹ) and log(θ*/ε)/(2μθ0). Returns (k,).
    """
    _check_regime(regime)
    theta0, theta_star, mu = (np.asarray(a, dtype=np.float64) for a in (theta0, theta_star, mu))
    if np.any(theta_star <= 0) or np.any(mu <= 0) or np.any(theta0 <= 0):
        raise ValueError("convergence_time needs θ* > 0, μ > 0 and θ0 > 0 (other modes never move "
                         "or converge to 0); select those modes first")
    gap = np.abs(theta_star - theta0)
    if regime == "linear":
        rate = 2 * mu * theta0
        if asymptotic:
            return np.log(theta_star / eps) / rate
        return np.log(np.maximum(gap / eps, 1.0)) / rate
    rate = 2 * mu * theta_star  # 2 ỹ
    if asymptotic:
        return np.log(theta_star**2 / (eps * theta0)) / rate
    # e^{−2ỹt} = θ0 ε / ((θ* ∓ ε)|θ* − θ0|), − when θ rises to θ*, + when it falls
    side = np.sign(theta_star - theta0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.log((theta_star - side * eps) * gap / (theta0 * eps)) / rate
    return np.where(gap > eps, t, 0.0)


def sequentialization(modes: QuadraticModes, theta0, lam: int, eps: float):
    """Eq. 15: every mode's value at the time mode ``lam`` gets ε-close to convergence.

    theta0: (d,) θ0_λ = ½ (w0_λ)². Returns (values, limits): values (d,) is θ_λ'(t_λ(ε))
    from the exact closed form; limits (d,) is the σ → 0 limit: θ*_λ' where ỹ_λ' > ỹ_λ,
    0 where 0 ≤ ỹ_λ' < ỹ_λ, θ*_λ − ε for λ itself, θ0 for null-space modes.
    """
    theta0 = np.asarray(theta0, dtype=np.float64)
    t_lam = convergence_time(theta0[lam:lam + 1], modes.theta_star[lam:lam + 1], modes.mu[lam:lam + 1], eps)
    values = mode_flow(theta0, modes.theta_star, modes.mu, t_lam)[0]
    limits = np.where(modes.y_tilde > modes.y_tilde[lam], modes.theta_star, 0.0)
    limits[lam] = modes.theta_star[lam] - eps
    limits[modes.rank:] = theta0[modes.rank:]
    return values, limits


def sequentialization_asymptotic(y_tilde, theta_star, theta0_scaled, sigma, lam: int, eps: float) -> np.ndarray:
    """The small-σ form of θ_λ'(t_λ(ε)) for θ0 = σ θ̃0 (eq. 15, corrected exponent):

        θ*_λ' θ̃0_λ' / (θ̃0_λ' + θ*_λ' [ε θ̃0_λ / θ*_λ²]^{r} σ^{r − 1}),  r = ỹ_λ'/ỹ_λ.

    y_tilde, theta_star, theta0_scaled: (k,) for modes with ỹ > 0. Returns (k,).
    """
    y_tilde, theta_star, theta0_scaled = (np.asarray(a, dtype=np.float64) for a in (y_tilde, theta_star, theta0_scaled))
    r = y_tilde / y_tilde[lam]
    base = eps * theta0_scaled[lam] / theta_star[lam] ** 2
    return theta_star * theta0_scaled / (theta0_scaled + theta_star * base**r * sigma ** (r - 1))


# ---- the three examples of §4.4 ------------------------------------------------------

class QuadraticExample(NamedTuple):
    """A data set of §4.4: X (n, d), y (n,), and named groups of example indices."""

    X: np.ndarray
    y: np.ndarray
    groups: dict


def example_learning_order(mu, d: int | None = None) -> QuadraticExample:
    """Example 1 (eq. 16): x_i = √μ_i e_i, y_i = μ_{n−i+1}/√μ_i, so ỹ_i = μ_{n−i+1}.

    mu: (n,) positive, non-increasing. d ≥ n (default n). The linear regime learns example i
    at rate σμ_i (low i first); the nonlinear one in order of ỹ_i (high i first).
    Groups: one per example, "x1" … "xn".
    """
    mu = np.asarray(mu, dtype=np.float64)
    n = mu.size
    d = n if d is None else d
    if d < n or np.any(mu <= 0) or np.any(np.diff(mu) > 0):
        raise ValueError("example 1 needs positive non-increasing mu and d ≥ n = len(mu)")
    X = np.zeros((n, d))
    X[np.arange(n), np.arange(n)] = np.sqrt(mu)
    y = mu[::-1] / np.sqrt(mu)
    return QuadraticExample(X, y, {f"x{i + 1}": np.array([i]) for i in range(n)})


def _labels_and_flips(n: int, q: int, seed: int):
    if not 1 <= q < -(-n // 2):
        raise ValueError(f"need 1 ≤ q < ⌈n/2⌉ flipped examples, got q={q} for n={n}")
    rng = np.random.default_rng(seed)
    labels = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    kappa = np.ones(n)
    kappa[rng.choice(n, size=q, replace=False)] = -1.0
    return labels, kappa


def example_label_noise(n: int = 20, q: int = 3, eta: float = 1.0, d: int | None = None, seed: int = 0) -> QuadraticExample:
    """Example 2 (eq. 17): x_i = κ_i y_i e_1 + η e_{i+1}, q examples with κ_i = −1 (noisy).

    Labels alternate ±1; the noisy examples are drawn with ``seed``. d > n (default n + 1).
    Groups: "clean" (κ = 1), "noisy" (κ = −1).
    """
    d = n + 1 if d is None else d
    if d < n + 1:
        raise ValueError(f"example 2 needs d ≥ n + 1 = {n + 1}, got d={d}")
    y, kappa = _labels_and_flips(n, q, seed)
    X = np.zeros((n, d))
    X[:, 0] = kappa * y
    X[np.arange(n), np.arange(n) + 1] = eta
    return QuadraticExample(X, y, {"clean": np.flatnonzero(kappa > 0), "noisy": np.flatnonzero(kappa < 0)})


def example_spurious(n: int = 20, q: int = 3, scale: float = 0.3, eta: float = 1.0, d: int | None = None,
                     seed: int = 0) -> QuadraticExample:
    """Example 3 (eq. 19): x_i = κ_i y_i e_1 + λ y_i e_2 + η e_{i+2}, λ = ``scale`` ∈ (0, 1).

    e_1 is the spurious feature (agrees with the label for the n − q majority examples,
    κ = 1), e_2 the core feature that separates all points. d ≥ n + 2 (default n + 2).
    Groups: "spurious" (κ = 1, majority), "no_spurious" (κ = −1, minority).
    """
    d = n + 2 if d is None else d
    if d < n + 2 or not 0 < scale < 1:
        raise ValueError(f"example 3 needs d ≥ n + 2 = {n + 2} and 0 < scale < 1, got d={d}, scale={scale}")
    y, kappa = _labels_and_flips(n, q, seed)
    X = np.zeros((n, d))
    X[:, 0] = kappa * y
    X[:, 1] = scale * y
    X[np.arange(n), np.arange(n) + 2] = eta
    return QuadraticExample(X, y, {"spurious": np.flatnonzero(kappa > 0), "no_spurious": np.flatnonzero(kappa < 0)})


def _check_regime(regime: str) -> None:
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
