"""Privacy accounting for DP-SGD with Google's ``dp-accounting`` library.

One DP-SGD step with Poisson sampling at rate ``q`` and Gaussian noise of
standard deviation ``sigma * C`` on the sum of gradients clipped to L2 norm
``C`` is the dp-accounting event
``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``; ``steps`` such steps are
its ``SelfComposedDpEvent``. Two accountants are offered:

* ``"pld"`` (default): privacy loss distributions, tight up to the
  discretisation (``value_discretization_interval=1e-3``).
* ``"rdp"``: Renyi DP, the moments-accountant family of Abadi et al. 2016;
  slightly looser (larger epsilon) but the figure most papers report.

Both assume Poisson sampling (each example joins each batch independently with
probability ``q``). :func:`autoinit_tf.privacy.poisson_batches` samples that
way; plain shuffled fixed-size batches do not, and the statement says so.
"""

from __future__ import annotations

import math

ACCOUNTANTS = ("pld", "rdp")
PLD_DISCRETIZATION = 1e-3


def _dp_accounting():
    try:
        import dp_accounting  # noqa: F401
        from dp_accounting import pld, rdp  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on environment
        raise ImportError(
            "autoinit_tf.privacy needs Google's dp-accounting library: "
            "pip install 'autoinit-tf[privacy]' (or pip install dp-accounting)."
        ) from err
    return dp_accounting


def check_accountant(accountant: str) -> str:
    name = str(accountant).lower()
    if name not in ACCOUNTANTS:
        raise ValueError(
            f"Unknown accountant {accountant!r}; use one of {ACCOUNTANTS} "
            "('pld' is tighter, 'rdp' is the figure most papers report)."
        )
    return name


def check_sampling_rate(sampling_rate: float) -> float:
    q = float(sampling_rate)
    if not (0.0 < q <= 1.0) or math.isnan(q):
        raise ValueError(
            f"sampling_rate must be in (0, 1], got {sampling_rate!r} "
            "(it is batch_size / dataset_size; a batch cannot be larger than the data set)."
        )
    return q


def check_delta(delta: float) -> float:
    d = float(delta)
    if not (0.0 < d < 1.0) or math.isnan(d):
        raise ValueError(f"delta must be in (0, 1), got {delta!r} (use about 1/dataset_size or less).")
    return d


def check_epsilon(epsilon: float) -> float:
    e = float(epsilon)
    if not (e > 0.0) or math.isinf(e):
        raise ValueError(f"target epsilon must be a finite number > 0, got {epsilon!r}.")
    return e


def check_noise_multiplier(noise_multiplier: float) -> float:
    s = float(noise_multiplier)
    if not (s >= 0.0) or math.isinf(s):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}.")
    return s


def check_steps(steps) -> int:
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}.")
    return int(steps)


def make_accountant(accountant: str = "pld"):
    """A fresh dp-accounting accountant: ``"pld"`` or ``"rdp"``."""
    dp_accounting = _dp_accounting()
    name = check_accountant(accountant)
    if name == "pld":
        return dp_accounting.pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    return dp_accounting.rdp.RdpAccountant()


def dp_sgd_event(sampling_rate: float, noise_multiplier: float, steps: int):
    """The dp-accounting event of ``steps`` Poisson-sampled Gaussian DP-SGD steps."""
    dp_accounting = _dp_accounting()
    q = check_sampling_rate(sampling_rate)
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(float(noise_multiplier))),
        check_steps(steps),
    )


def compute_epsilon(
    sampling_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
) -> float:
    """Epsilon spent by ``steps`` DP-SGD steps at (``delta``).

    Returns ``inf`` when ``noise_multiplier`` is 0 (no privacy) and 0 for 0 steps.
    """
    check_delta(delta)
    check_sampling_rate(sampling_rate)
    sigma = check_noise_multiplier(noise_multiplier)
    steps = check_steps(steps)
    if steps == 0:
        return 0.0
    if sigma == 0.0:
        return math.inf
    acc = make_accountant(accountant)
    acc.compose(dp_sgd_event(sampling_rate, sigma, steps))
    return float(acc.get_epsilon(delta))


def calibrate_noise_multiplier(
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
    tol: float | None = None,
) -> float:
    """Smallest noise multiplier whose epsilon after ``steps`` steps is <= ``target_epsilon``.

    Uses ``dp_accounting.calibrate_dp_mechanism`` (bracketing + bisection); the
    returned sigma is on the safe side of the target.
    """
    dp_accounting = _dp_accounting()
    eps = check_epsilon(target_epsilon)
    check_delta(delta)
    q = check_sampling_rate(sampling_rate)
    steps = check_steps(steps)
    if steps == 0:
        raise ValueError("Cannot calibrate the noise for 0 training steps.")
    name = check_accountant(accountant)
    kwargs = {} if tol is None else {"tol": tol}
    sigma = dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(name),
        lambda s: dp_sgd_event(q, s, steps),
        target_epsilon=eps,
        target_delta=delta,
        **kwargs,
    )
    return float(sigma)


def steps_per_epoch(dataset_size: int, batch_size: int) -> int:
    """Steps in one epoch: ``ceil(dataset_size / batch_size)`` (what Keras runs for plain batches
    and what :func:`poisson_batches` yields), so calibration covers every step actually taken."""
    return int(math.ceil(int(dataset_size) / int(batch_size)))
