"""The privacy statement of a DP-trained model: every figure needed to interpret epsilon."""

from __future__ import annotations

import dataclasses

from autoinit_tf.privacy import accounting
from autoinit_tf.privacy.model import get_state

POISSON_CAVEAT = (
    "Some steps used plain (shuffled, fixed-size) batches: the accountants assume Poisson "
    "sampling, so for those steps epsilon is the figure Poisson sampling would give, not a "
    "proven bound for the sampling actually used. Train on privacy.poisson_batches(...) for an "
    "honest figure."
)


@dataclasses.dataclass(frozen=True)
class PrivacyStatement:
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

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [
            f"(epsilon = {self.epsilon:.4g}, delta = {self.delta:.3g})-DP for each training example "
            f"(example-level, add/remove-one neighbouring), {self.accountant.upper()} accountant (dp-accounting).",
            f"DP-SGD: {self.steps} steps, sampling {self.sampling}, rate q = {self.sampling_rate:.6g} "
            f"(expected batch {self.batch_size} of {self.dataset_size}), noise multiplier "
            f"{self.noise_multiplier:.4g}, per-example L2 clip norm {self.l2_norm_clip:.4g}"
            + (f", augmentation multiplicity {self.augmult}" if self.augmult > 1 else "")
            + ".",
        ]
        lines.extend("Caveat: " + c for c in self.caveats)
        return "\n".join(lines)


def statement(model, delta: float | None = None, accountant: str | None = None) -> PrivacyStatement:
    """Privacy statement for the steps the model has taken so far (counted by the DP train step)."""
    state = get_state(model)
    cfg = state.config
    delta = cfg.delta if delta is None else accounting.check_delta(delta)
    accountant = cfg.accountant if accountant is None else accounting.check_accountant(accountant)
    steps = state.steps_taken
    poisson = state.poisson_steps_taken
    eps = accounting.compute_epsilon(cfg.sampling_rate, cfg.noise_multiplier, steps, delta, accountant)
    caveats = []
    if steps == 0:
        sampling = "none yet"
    elif poisson == steps:
        sampling = "Poisson (privacy.poisson_batches)"
    elif poisson == 0:
        sampling = "plain shuffled batches (epsilon assumes Poisson sampling)"
        caveats.append(POISSON_CAVEAT)
    else:
        sampling = f"mixed: {poisson} Poisson steps, {steps - poisson} plain-batch steps (epsilon assumes Poisson sampling)"
        caveats.append(POISSON_CAVEAT)
    mismatched = state.rate_mismatch_steps
    if poisson and mismatched:
        caveats.append(
            f"{mismatched} Poisson batches were sampled at a rate other than the configured "
            f"{cfg.sampling_rate:.6g}; the figure uses the configured rate and the noise was scaled for the "
            "configured batch size. Use the same batch_size and data set in both."
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
        sampling=sampling,
        sampling_rate=cfg.sampling_rate,
        steps=steps,
        poisson_steps=poisson,
        noise_multiplier=cfg.noise_multiplier,
        l2_norm_clip=cfg.l2_norm_clip,
        batch_size=cfg.batch_size,
        dataset_size=cfg.dataset_size,
        augmult=cfg.augmult,
        caveats=tuple(caveats),
    )


def epsilon(model, delta: float | None = None, accountant: str | None = None) -> float:
    """Epsilon spent so far by a model trained with make_private."""
    state = get_state(model)
    cfg = state.config
    return accounting.compute_epsilon(
        cfg.sampling_rate,
        cfg.noise_multiplier,
        state.steps_taken,
        cfg.delta if delta is None else delta,
        cfg.accountant if accountant is None else accountant,
    )
