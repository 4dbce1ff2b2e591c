"""Accounting: figures from the literature and equality with dp-accounting called directly."""

import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from autoinit_tf import privacy
from autoinit_tf.privacy import accounting

Q = 256 / 60_000
DELTA = 1e-5


def _event(q, sigma, steps):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )


def test_rdp_reference_figure():
    eps = privacy.compute_epsilon(Q, 1.1, 14_062, DELTA, accountant="rdp")
    assert eps == pytest.approx(2.597, abs=5e-4)


def test_pld_is_default_and_tighter():
    eps_pld = privacy.compute_epsilon(Q, 1.1, 14_062, DELTA)
    eps_rdp = privacy.compute_epsilon(Q, 1.1, 14_062, DELTA, accountant="rdp")
    assert eps_pld == pytest.approx(2.3905, abs=2e-3)
    assert eps_pld < eps_rdp


@pytest.mark.parametrize("q,sigma,steps", [(Q, 1.1, 14_062), (0.01, 0.8, 500), (0.1, 2.0, 37), (1.0, 5.0, 3)])
def test_equals_dp_accounting_called_directly(q, sigma, steps):
    direct_rdp = rdp.RdpAccountant().compose(_event(q, sigma, steps)).get_epsilon(DELTA)
    direct_pld = (
        pld.PLDAccountant(value_discretization_interval=1e-3).compose(_event(q, sigma, steps)).get_epsilon(DELTA)
    )
    assert privacy.compute_epsilon(q, sigma, steps, DELTA, "rdp") == direct_rdp
    assert privacy.compute_epsilon(q, sigma, steps, DELTA, "pld") == direct_pld


def test_calibration_reference_figure():
    sigma = privacy.calibrate_noise_multiplier(3.0, Q, 3515, DELTA, accountant="rdp")
    assert sigma == pytest.approx(0.774, abs=1e-3)
    direct = dp_accounting.calibrate_dp_mechanism(
        rdp.RdpAccountant, lambda s: _event(Q, s, 3515), target_epsilon=3.0, target_delta=DELTA
    )
    assert sigma == direct
    # the calibrated sigma meets the target, a slightly smaller one does not
    assert privacy.compute_epsilon(Q, sigma, 3515, DELTA, "rdp") <= 3.0
    assert privacy.compute_epsilon(Q, sigma * 0.99, 3515, DELTA, "rdp") > 3.0


def test_pld_calibration_meets_target():
    sigma = privacy.calibrate_noise_multiplier(2.0, 0.01, 300, DELTA)
    assert privacy.compute_epsilon(0.01, sigma, 300, DELTA) <= 2.0
    assert privacy.compute_epsilon(0.01, sigma * 0.98, 300, DELTA) > 2.0


def test_monotone_and_edge_cases():
    assert privacy.compute_epsilon(Q, 1.1, 0, DELTA) == 0.0
    assert math.isinf(privacy.compute_epsilon(Q, 0.0, 10, DELTA))
    e1 = privacy.compute_epsilon(0.01, 1.0, 100, DELTA, "rdp")
    e2 = privacy.compute_epsilon(0.01, 1.0, 200, DELTA, "rdp")
    e3 = privacy.compute_epsilon(0.01, 2.0, 200, DELTA, "rdp")
    assert e1 < e2 and e3 < e2


def test_steps_per_epoch():
    assert privacy.steps_per_epoch(60_000, 256) == 235
    assert privacy.steps_per_epoch(1000, 100) == 10


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sampling_rate=0.0), "sampling_rate"),
        (dict(sampling_rate=1.5), "sampling_rate"),
        (dict(delta=1.0), "delta"),
        (dict(delta=0.0), "delta"),
        (dict(noise_multiplier=-1.0), "noise_multiplier"),
        (dict(steps=-3), "steps"),
        (dict(accountant="moments"), "accountant"),
    ],
)
def test_bad_parameters(kwargs, match):
    args = dict(sampling_rate=0.01, noise_multiplier=1.0, steps=10, delta=DELTA, accountant="rdp")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        privacy.compute_epsilon(**args)


@pytest.mark.parametrize("eps", [0.0, -1.0, float("inf")])
def test_bad_target_epsilon(eps):
    with pytest.raises(ValueError, match="epsilon"):
        privacy.calibrate_noise_multiplier(eps, 0.01, 100, DELTA)


def test_accountant_objects():
    assert isinstance(accounting.make_accountant("pld"), pld.PLDAccountant)
    assert isinstance(accounting.make_accountant("RDP"), rdp.RdpAccountant)
