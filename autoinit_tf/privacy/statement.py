"""The privacy statement of a DP-trained model: every figure needed to interpret epsilon."""

from __future__ import annotations

import dataclasses
import math

from autoinit_tf.privacy import accounting, ledger
from autoinit_tf.privacy.state import get_state

NOT_POISSON_CAVEAT = (
    "{n} of {steps} steps did not use untruncated Poisson sampling ({what}): the accountants "
    "analyse Poisson sampling only, so no (epsilon, delta) guarantee is proven for this training. "
    "The reference figure above is what Poisson sampling at the rates used would give; for "
    "shuffled fixed-size batches the true privacy can be much worse. Train on "
    "privacy.poisson_batches(...) (with padding='auto', never truncated) for a proven figure."
)


@dataclasses.dataclass(frozen=True)
class PrivacyStatement:
    """What DP-SGD training proved.

    ``epsilon`` is the proven bound at ``delta`` when ``guarantee`` is True, ``inf`` otherwise;
    ``reference_epsilon`` is the figure Poisson sampling at the rates used would give (equal to
    ``epsilon`` when proven). ``rates`` lists ``(sampling rate, steps)`` of the Poisson steps,
    ``plain_batches`` ``(batch size, steps)`` of the plain ones.
    """

    epsilon: float
    delta: float
    accountant: str
    sampling: str
    sampling_rate: float
    steps: int
    poisson_steps: int
    noise_multiplier: float
    l2_norm_clip: float
    batch_size: int
    dataset_size: int
    augmult: int
    caveats: tuple
    guarantee: bool = True
    reference_epsilon: float = 0.0
    plain_steps: int = 0
    truncated_steps: int = 0
    unknown_steps: int = 0
    rates: tuple = ()
    plain_batches: tuple = ()

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        if self.noise_multiplier == 0:
            head = "NO differential-privacy guarantee: noise_multiplier is 0 (gradients clipped, not noised)."
        elif self.guarantee:
            head = (
                f"(epsilon = {self.epsilon:.4g}, delta = {self.delta:.3g})-DP for each training example "
                f"(example-level, add/remove-one neighbouring), {self.accountant.upper()} accountant (dp-accounting)."
            )
        else:
            head = (
                f"NO proven differential-privacy guarantee: {self.steps - self.poisson_steps + self.truncated_steps} "
                f"of {self.steps} steps were not untruncated Poisson steps. Reference only: Poisson "
                f"sampling at the rates used would give epsilon = {self.reference_epsilon:.4g} at delta = "
                f"{self.delta:.3g} ({self.accountant.upper()} accountant)."
            )
        rates = ", ".join(f"q = {q:.6g} x {n}" for q, n in self.rates)
        lines = [
            head,
            f"DP-SGD: {self.steps} steps, sampling {self.sampling}"
            + (f" ({rates})" if len(self.rates) > 1 else f", rate q = {self.sampling_rate:.6g}")
            + f" (expected batch {self.batch_size} of {self.dataset_size}), noise multiplier "
            f"{self.noise_multiplier:.4g}, per-example L2 clip norm {self.l2_norm_clip:.4g}"
            + (f", augmentation multiplicity {self.augmult}" if self.augmult > 1 else "")
            + ".",
        ]
        lines.extend("Caveat: " + c for c in self.caveats)
        return "\n".join(lines)


def _sampling_words(ledger):
    steps, poisson = ledger.steps, ledger.poisson_steps
    if steps == 0:
        return "none yet"
    if ledger.proven:
        return "Poisson (privacy.poisson_batches)"
    parts = []
    if poisson - ledger.truncated:
        parts.append(f"{poisson - ledger.truncated} Poisson")
    if ledger.truncated:
        parts.append(f"{ledger.truncated} truncated Poisson")
    if ledger.plain_steps:
        parts.append(f"{ledger.plain_steps} plain-batch")
    if ledger.overflow:
        parts.append(f"{ledger.overflow} of unrecorded sampling")
    if ledger.plain_steps == steps:
        return "plain shuffled batches (no accountant covers them; the reference figure assumes Poisson sampling)"
    return "mixed: " + ", ".join(parts) + " steps (the reference figure assumes Poisson sampling)"


def statement(model, delta: float | None = None, accountant: str | None = None) -> PrivacyStatement:
    """Privacy statement for the steps the model has taken so far (counted by the DP train step).

    Each Poisson step is accounted at the rate its batch carried (steps at several rates
    compose as separate events); a guarantee is claimed only when every step was an
    untruncated Poisson step.
    """
    state = get_state(model)
    cfg = state.config
    delta = cfg.delta if delta is None else accounting.check_delta(delta)
    accountant = cfg.accountant if accountant is None else accounting.check_accountant(accountant)
    book = state.ledger()
    events = book.events(cfg.noise_multiplier, cfg.dataset_size)
    if book.overflow:
        events.append((cfg.sampling_rate, book.overflow))
    reference = ledger.epsilon_of_events(events, cfg.noise_multiplier, delta, accountant)
    proven = book.proven
    eps = reference if proven else math.inf
    caveats = []
    if not proven:
        what = []
        if book.plain_steps:
            sizes = ", ".join(f"{n} x {b}" for b, n in sorted(book.plain.items()))
            what.append(f"{book.plain_steps} plain batches ({sizes} examples)")
        if book.truncated:
            what.append(f"{book.truncated} Poisson batches truncated to max_batch_size")
        if book.overflow:
            what.append(f"{book.overflow} steps whose sampling was not recorded (more than 16 distinct rates or sizes)")
        caveats.append(
            NOT_POISSON_CAVEAT.format(n=book.plain_steps + book.truncated + book.overflow, steps=book.steps, what="; ".join(what))
        )
    mismatched = state.rate_mismatch_steps
    if mismatched:
        caveats.append(
            f"{mismatched} Poisson batches were sampled at a rate other than the configured "
            f"{cfg.sampling_rate:.6g}; they are accounted at the rate they carried, but the noise was "
            "calibrated (and the gradient divided) for the configured batch size. Use the same "
            "batch_size and data set in both."
        )
    if cfg.noise_multiplier == 0:
        caveats.append("noise_multiplier is 0: no privacy guarantee (epsilon is infinite).")
    caveats.append(
        "Training losses/metrics logged during fit are computed from the private data and are not covered."
    )
    return PrivacyStatement(
        epsilon=eps,
        delta=delta,
        accountant=accountant,
        sampling=_sampling_words(book),
        sampling_rate=cfg.sampling_rate,
        steps=book.steps,
        poisson_steps=book.poisson_steps,
        noise_multiplier=cfg.noise_multiplier,
        l2_norm_clip=cfg.l2_norm_clip,
        batch_size=cfg.batch_size,
        dataset_size=cfg.dataset_size,
        augmult=cfg.augmult,
        caveats=tuple(caveats),
        guarantee=proven and cfg.noise_multiplier > 0,
        reference_epsilon=reference,
        plain_steps=book.plain_steps,
        truncated_steps=book.truncated,
        unknown_steps=book.overflow,
        rates=tuple(sorted(book.poisson.items())),
        plain_batches=tuple(sorted(book.plain.items())),
    )


def epsilon(model, delta: float | None = None, accountant: str | None = None) -> float:
    """Epsilon proven so far by a model trained with make_private (``inf`` when no guarantee is
    proven: plain or truncated batches; see :func:`statement` for the reference figure)."""
    return statement(model, delta, accountant).epsilon
