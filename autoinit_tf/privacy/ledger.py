"""The ledger of DP steps: how each step's batch was actually sampled.

Every DP step is one of

* a **Poisson** batch at rate ``q`` (from :func:`autoinit_tf.privacy.poisson_batches`, or any
  batch carrying the Poisson mask and rate): the dp-accounting event
  ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``;
* a **truncated** Poisson batch (``padding="max"`` cut a batch larger than ``max_batch_size``):
  not the sampling the accountant analyses;
* a **plain** batch of ``b`` examples (``fit(x, y, batch_size=b)``: shuffled, fixed size): not
  Poisson sampling either; shuffling has no accountant in dp-accounting, and its true
  privacy can be far worse than the Poisson figure.

The noise on the clipped sum is ``N(0, sigma^2 C^2)`` in every case and the sum's sensitivity
is ``C``, so each Poisson step at rate ``q_i`` is exactly the event above, whatever rate the
noise was calibrated for; steps at several rates compose as separate events. The statement
claims an (epsilon, delta) guarantee only when every step was an untruncated Poisson step;
otherwise it gives, as a reference that proves nothing, the figure Poisson sampling at the
rates used (``b / N`` for plain batches) would give.
"""

from __future__ import annotations

import collections
import dataclasses
import math

from autoinit_tf.privacy import accounting

#: Distinct Poisson rates / plain batch sizes a TensorFlow step counter holds (more: "overflow").
SLOTS = 16


@dataclasses.dataclass
class StepLedger:
    """Counts of DP steps by sampling: ``poisson[q]``, ``plain[b]``, ``truncated``, ``overflow``.

    ``truncated`` steps are also counted in ``poisson`` (at their nominal rate); ``overflow``
    counts steps whose rate or size did not fit the backend's fixed-size counters (unknown).
    """

    poisson: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    plain: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    truncated: int = 0
    overflow: int = 0

    @property
    def steps(self) -> int:
        return sum(self.poisson.values()) + sum(self.plain.values()) + self.overflow

    @property
    def poisson_steps(self) -> int:
        return sum(self.poisson.values())

    @property
    def plain_steps(self) -> int:
        return sum(self.plain.values())

    @property
    def proven(self) -> bool:
        """Every step an untruncated Poisson step (vacuously true for no step)."""
        return self.plain_steps == 0 and self.truncated == 0 and self.overflow == 0

    def record_poisson(self, rate: float, truncated: bool = False, n: int = 1):
        self.poisson[float(rate)] += int(n)
        if truncated:
            self.truncated += int(n)

    def record_plain(self, batch_size: int, n: int = 1):
        self.plain[int(batch_size)] += int(n)

    def minus(self, earlier: "StepLedger") -> "StepLedger":
        """The steps taken since ``earlier`` (a copy taken before)."""
        return StepLedger(
            poisson=self.poisson - earlier.poisson,
            plain=self.plain - earlier.plain,
            truncated=self.truncated - earlier.truncated,
            overflow=self.overflow - earlier.overflow,
        )

    def plus(self, other: "StepLedger") -> "StepLedger":
        return StepLedger(
            poisson=self.poisson + other.poisson,
            plain=self.plain + other.plain,
            truncated=self.truncated + other.truncated,
            overflow=self.overflow + other.overflow,
        )

    def copy(self) -> "StepLedger":
        return self.plus(StepLedger())

    def events(self, noise_multiplier: float, dataset_size: int):
        """``[(rate, steps)]`` of every step as a Poisson event: Poisson steps at their rate, plain
        batches at ``b / N`` (for the reference figure only)."""
        out = [(q, n) for q, n in sorted(self.poisson.items()) if n > 0]
        for b, n in sorted(self.plain.items()):
            if n > 0:
                out.append((min(1.0, b / dataset_size), n))
        return out


def epsilon_of_events(events, noise_multiplier: float, delta: float, accountant: str) -> float:
    """Epsilon of Poisson-sampled Gaussian steps at several rates, composed (dp-accounting)."""
    accounting.check_delta(delta)
    sigma = accounting.check_noise_multiplier(noise_multiplier)
    events = [(q, n) for q, n in events if n > 0]
    if not events:
        return 0.0
    if sigma == 0.0:
        return math.inf
    acc = accounting.make_accountant(accountant)
    for q, n in events:
        acc.compose(accounting.dp_sgd_event(q, sigma, n))
    return float(acc.get_epsilon(delta))
