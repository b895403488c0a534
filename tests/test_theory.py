"""fasttangent.theory: closed forms of the quadratic model vs ODE solves and discrete GD.

References are independent of the closed forms: the gradient flow ẇ = −∇_w ½‖Xθ(w) − y‖²
integrated by scipy in the original coordinates, and plain gradient descent in w.
"""
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from fasttangent import theory


def _theta_of_w(V, w, w0, regime):
    """θ(w) = ½ V w² (nonlinear) or its linearization θ0 + V (w0 (w − w0))."""
    if regime == "nonlinear":
        return V @ (0.5 * w**2)
    return V @ (0.5 * w0**2 + w0 * (w - w0))


def _grad_w(X, y, V, w, w0, regime):
    residual_grad = V.T @ (X.T @ (X @ _theta_of_w(V, w, w0, regime) - y))  # ∂ℓ/∂θ in the v basis
    return (w if regime == "nonlinear" else w0) * residual_grad


def _ode_thetas(X, y, V, w0, times, regime):
    sol = solve_ivp(lambda t, w: -_grad_w(X, y, V, w, w0, regime), (0.0, times[-1]), w0,
                    t_eval=times, method="DOP853", rtol=1e-10, atol=1e-12)
    assert sol.success, sol.message
    return np.stack([_theta_of_w(V, w, w0, regime) for w in sol.y.T])


def _gd_thetas(X, y, V, w0, step, t_end, regime):
    w = w0.copy()
    for _ in range(int(round(t_end / step))):
        w = w - step * _grad_w(X, y, V, w, w0, regime)
    return _theta_of_w(V, w, w0, regime)


def _random_problem(n, d, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) / np.sqrt(d)
    y = rng.normal(size=n)
    w0 = rng.normal(size=d) * 0.5
    return X, y, w0


def _rel_err(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


SHAPES = [(4, 7), (5, 5), (8, 3)]  # n < d, n = d, n > d


@pytest.mark.parametrize("regime", theory.REGIMES)
@pytest.mark.parametrize("n,d", SHAPES)
def test_closed_form_matches_ode(n, d, regime):
    X, y, w0 = _random_problem(n, d, seed=10 * n + d)
    modes = theory.quadratic_modes(X, y)
    times = np.linspace(0.0, 30.0, 61)
    closed = theory.quadratic_flow(X, y, w0, times, regime)
    ode = _ode_thetas(X, y, modes.V, w0, times, regime)
    assert closed.shape == (times.size, d)
    assert _rel_err(closed @ X.T, ode @ X.T) < 1e-6
    assert _rel_err(closed, ode) < 1e-6  # null-space part included
    # the dynamics moves: the end is far from the start and near the least-squares fit
    assert _rel_err(closed[-1] @ X.T, closed[0] @ X.T) > 0.1


@pytest.mark.parametrize("n,d", SHAPES)
def test_modes_are_an_svd_with_nonnegative_label_components(n, d):
    X, y, _ = _random_problem(n, d, seed=1)
    m = theory.quadratic_modes(X, y)
    np.testing.assert_allclose(m.V.T @ m.V, np.eye(d), atol=1e-12)
    r = m.rank
    assert r == min(n, d)
    np.testing.assert_allclose(X @ m.V[:, :r], m.U[:, :r] * np.sqrt(m.mu[:r]), atol=1e-12)
    np.testing.assert_allclose(X @ m.V[:, r:], 0, atol=1e-12)
    assert np.all(m.y_modes >= 0)
    np.testing.assert_allclose(m.y_modes[:r], m.U[:, :r].T @ y, atol=1e-12)
    # θ* = least-squares solution (pseudo-inverse) on the range of Xᵀ
    np.testing.assert_allclose(m.V @ m.theta_star, np.linalg.pinv(X) @ y, atol=1e-10)


def test_repeated_singular_values_put_y_on_one_mode():
    ex = theory.example_label_noise(n=12, q=2, eta=0.7)
    m = theory.quadratic_modes(ex.X, ex.y)
    np.testing.assert_allclose(m.mu[1:m.rank], 0.7**2, rtol=1e-12)  # an (n−1)-fold singular value
    assert m.y_modes[1] > 0.1
    np.testing.assert_allclose(m.y_modes[2:], 0, atol=1e-12)
    # eq. 18: u1 = ȳ/√n and y1 = (1 − 2q/n) ȳ
    ybar = ex.X[:, 0]
    np.testing.assert_allclose(m.y_modes[0] * m.U[:, 0], (1 - 2 * 2 / 12) * ybar, atol=1e-12)


@pytest.mark.parametrize("regime", theory.REGIMES)
def test_closed_form_matches_ode_on_degenerate_example(regime):
    ex = theory.example_spurious(n=10, q=2, scale=0.4, eta=0.8)
    d = ex.X.shape[1]
    modes = theory.quadratic_modes(ex.X, ex.y)
    w0 = np.sqrt(0.02) * np.ones(d)
    times = np.linspace(0.0, 200.0, 41)
    closed = theory.quadratic_flow(ex.X, ex.y, w0, times, regime)
    ode = _ode_thetas(ex.X, ex.y, modes.V, w0, times, regime)
    assert _rel_err(closed @ ex.X.T, ode @ ex.X.T) < 1e-6


def test_mode_flow_sign_cases_against_ode():
    """θ* < 0, θ* = 0, θ0 = 0 (fixed point), μ = 0 (null mode), θ0 > θ*: each mode alone."""
    theta0 = np.array([0.3, 0.3, 0.0, 0.4, 0.2, 1.5])
    theta_star = np.array([-0.5, 0.0, 0.7, 0.9, 0.8, 0.4])
    mu = np.array([1.3, 0.8, 1.0, 0.0, 2.0, 0.6])
    times = np.linspace(0, 8, 33)
    for regime, rate in (("nonlinear", lambda th: 2 * mu * th), ("linear", lambda th: 2 * mu * theta0)):
        closed = theory.mode_flow(theta0, theta_star, mu, times, regime)
        sol = solve_ivp(lambda t, th: -rate(th) * (th - theta_star), (0, times[-1]), theta0,
                        t_eval=times, method="DOP853", rtol=1e-11, atol=1e-13)
        np.testing.assert_allclose(closed, sol.y.T, rtol=1e-7, atol=1e-10)
    nonlinear = theory.mode_flow(theta0, theta_star, mu, times)
    assert np.all(nonlinear[:, 2] == 0) and np.all(nonlinear[:, 3] == 0.4)
    assert np.all(nonlinear >= 0)  # θ = ½w² never crosses 0, even when θ* < 0


def test_mode_flow_is_stable_for_extreme_arguments():
    theta0 = np.array([1e-12, 0.5, 0.5])
    theta_star = np.array([2.0, -3.0, 1e-14])
    mu = np.array([1.0, 50.0, 1.0])
    out = theory.mode_flow(theta0, theta_star, mu, np.array([0.0, 1e3, 1e6]))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0], theta0)
    np.testing.assert_allclose(out[-1, :2], [2.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(out[-1, 2], 0.5 / (1 + 2 * 0.5 * 1e6), rtol=1e-6)  # ≈ the θ* = 0 branch


@pytest.mark.parametrize("regime", theory.REGIMES)
def test_gradient_descent_converges_to_the_flow(regime):
    X, y, w0 = _random_problem(5, 7, seed=3)
    modes = theory.quadratic_modes(X, y)
    t_end = 4.0
    exact = theory.quadratic_flow(X, y, w0, [t_end], regime)[0]
    errors = [_rel_err(_gd_thetas(X, y, modes.V, w0, step, t_end, regime) @ X.T, exact @ X.T)
              for step in (0.04, 0.02, 0.01)]
    assert errors[0] < 0.05
    # first order in the step: halving it halves the error
    for coarse, fine in zip(errors, errors[1:]):
        assert 1.7 < coarse / fine < 2.3


def test_eq13_printed_rate_is_wrong_and_twice_it_is_right():
    X, y, w0 = _random_problem(4, 6, seed=5)
    modes = theory.quadratic_modes(X, y)
    times = np.linspace(0, 20, 41)
    ode = _ode_thetas(X, y, modes.V, w0, times, "linear")
    theta0 = 0.5 * w0**2
    ts = times[:, None]

    def eq13(rate):
        return (modes.theta_star + np.exp(-rate * ts) * (theta0 - modes.theta_star)) @ modes.V.T

    printed = eq13(modes.mu * theta0)        # eq. 13 as printed: μ θ0
    corrected = eq13(2 * modes.mu * theta0)  # μ w0² = 2 μ θ0
    assert _rel_err(corrected @ X.T, ode @ X.T) < 1e-6
    assert _rel_err(printed @ X.T, ode @ X.T) > 1e-2


def test_eq12_rate_is_two_y_tilde():
    """The nonlinear closed form with e^{−ỹt} instead of e^{−2ỹt} disagrees with the ODE."""
    X, y, w0 = _random_problem(4, 6, seed=6)
    modes = theory.quadratic_modes(X, y)
    times = np.linspace(0, 20, 41)
    ode = _ode_thetas(X, y, modes.V, w0, times, "nonlinear")
    theta0 = 0.5 * w0**2
    r = modes.rank
    halved = theory.mode_flow(theta0[:r], modes.theta_star[:r], 0.5 * modes.mu[:r], times) @ modes.V[:, :r].T
    assert _rel_err(halved @ X.T, ode @ X.T) > 1e-2


@pytest.mark.parametrize("regime", theory.REGIMES)
def test_convergence_time_inverts_the_flow(regime):
    theta0 = np.array([1e-3, 0.02, 2.0])
    theta_star = np.array([1.0, 0.5, 0.7])
    mu = np.array([2.0, 0.7, 1.1])
    eps = 1e-4
    t = theory.convergence_time(theta0, theta_star, mu, eps, regime)
    at_t = np.array([theory.mode_flow(theta0[i:i + 1], theta_star[i:i + 1], mu[i:i + 1], [t[i]], regime)[0, 0]
                     for i in range(3)])
    np.testing.assert_allclose(np.abs(at_t - theta_star), eps, rtol=1e-6)
    # eq. 14 (corrected) is the ε, θ0 ≪ θ* limit of the exact time
    approx = theory.convergence_time(theta0[:1], theta_star[:1], mu[:1], eps, regime, asymptotic=True)
    np.testing.assert_allclose(approx, t[:1], rtol=2e-3)


def test_sequentialization_limits_as_sigma_goes_to_zero():
    """Eq. 15: at t_λ(ε), faster modes (ỹ' > ỹ) have converged, slower ones (ỹ' < ỹ) not started."""
    mu = np.array([1.0, 1.0, 1.0, 1.0])
    y_modes = np.array([2.0, 1.5, 1.0, 0.75])  # ỹ = y here; ratios to mode 1: 4/3, 2/3, 1/2
    modes = theory.QuadraticModes(mu, np.eye(4), np.eye(4), y_modes, y_modes, y_modes, 4)
    theta0_scaled = np.array([1.0, 0.7, 1.3, 0.9])
    lam, eps = 1, 1e-2
    gaps = []
    for sigma in (1e-6, 1e-12, 1e-24):
        values, limits = theory.sequentialization(modes, sigma * theta0_scaled, lam, eps)
        gaps.append(np.abs(values - limits))
        asym = theory.sequentialization_asymptotic(modes.y_tilde, modes.theta_star, theta0_scaled, sigma, lam, eps)
        others = np.arange(4) != lam
        np.testing.assert_allclose(asym[others], values[others], rtol=1e-2, atol=1e-14)
    gaps = np.array(gaps)
    assert np.all(gaps[-1] < 2e-3)
    others = np.arange(4) != lam
    assert np.all(gaps[-1, others] < gaps[0, others])
    # ỹ'/ỹ = 2/3 lies in (1/2, 1): the printed exponent 2ỹ'/ỹ − 1 > 0 would predict θ*' here,
    # but mode 2 has not moved
    assert values[2] < 1e-3 * modes.theta_star[2]


def test_example1_learning_order_flips_between_regimes():
    mu = np.array([2.0, 1.5, 1.0, 0.5])
    ex = theory.example_learning_order(mu, d=6)
    modes = theory.quadratic_modes(ex.X, ex.y)
    w0 = np.sqrt(1e-3) * np.ones(6)
    times = np.geomspace(1e-2, 1e6, 4000)
    order = {}
    for regime in theory.REGIMES:
        err = theory.per_example_squared_error(ex.X, ex.y, theory.quadratic_flow(ex.X, ex.y, w0, times, regime, modes=modes))
        half = err < 0.5 * err[0]
        assert half[-1].all()
        order[regime] = np.argsort(half.argmax(axis=0), kind="stable")  # examples by time to halve their error
    np.testing.assert_array_equal(order["linear"], [0, 1, 2, 3])
    np.testing.assert_array_equal(order["nonlinear"], [3, 2, 1, 0])


def test_example2_nonlinear_fits_clean_examples_first():
    ex = theory.example_label_noise(n=20, q=3, eta=1.0)
    d = ex.X.shape[1]
    w0 = np.sqrt(1e-4) * np.ones(d)
    times = np.linspace(0, 10, 401)
    err = theory.per_example_squared_error(ex.X, ex.y, theory.quadratic_flow(ex.X, ex.y, w0, times))
    clean, noisy = err[:, ex.groups["clean"]].mean(1), err[:, ex.groups["noisy"]].mean(1)
    peak = noisy.argmax()
    # at the noisy examples' worst point, they carry the flipped label (1 − 2q/n)·(−y) + ...
    assert clean[peak] < 0.2 and noisy[peak] > 2.0
    assert noisy[-1] < 1e-3


def test_examples_validate_their_arguments():
    with pytest.raises(ValueError, match="q"):
        theory.example_label_noise(n=6, q=3)
    with pytest.raises(ValueError, match="d ≥ n"):
        theory.example_spurious(n=6, q=1, d=7)
    with pytest.raises(ValueError, match="non-increasing"):
        theory.example_learning_order([1.0, 2.0])
    with pytest.raises(ValueError, match="regime"):
        theory.mode_flow([0.1], [1.0], [1.0], [0.0, 1.0], regime="lazy")


def test_fig4_curves_are_scaled_to_one_percent_loss():
    from fasttangent.reproduce import quadratic

    curves = quadratic.theory_curves(points=801)
    for ex in ("ex1", "ex2", "ex3"):
        for regime in theory.REGIMES:
            key = f"{ex}_{regime}"
            loss, scaled = curves[f"{key}_loss"], curves[f"{key}_scaled_time"]
            assert np.all(np.diff(loss) <= 1e-12)  # gradient flow never increases the loss
            np.testing.assert_allclose(np.interp(1.0, scaled, loss), 0.01 * loss[0], rtol=2e-2)


@pytest.mark.slow
def test_reproduce_quadratic_writes_figures_and_curves(tmp_path):
    from fasttangent.reproduce import quadratic

    assert quadratic.main(["--out", str(tmp_path), "--quick"]) == 0
    for name in ("fig4_quadratic.png", "fig14_mlp2.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    curves = np.load(tmp_path / "curves.npz")
    # Fig. 4 data: the closed-form noisy examples peak near (1 + (1 − 2q/n))² = 2.89 (eq. 18)
    assert abs(curves["fig4_ex2_nonlinear_noisy"].max() - (1 + (1 - 2 * 3 / 20)) ** 2) < 0.05
    # Fig. 14 data: every network run decreased its training loss
    for key in curves.files:
        if key.startswith("fig14_") and key.endswith("_loss"):
            assert curves[key][-1] < 0.5 * curves[key][0], key
