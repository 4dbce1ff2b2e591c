"""Differentially private training (DP-SGD) for Keras 3, with dp-accounting privacy figures.

    from autoinit_tf import privacy
    model = privacy.make_private(model, l2_norm_clip=1.0, target_epsilon=3.0, target_delta=1e-5,
                                 batch_size=256, dataset_size=60_000, epochs=20)
    model.compile(optimizer="sgd", loss=..., metrics=[...])
    model.fit(privacy.poisson_batches(x, y, batch_size=256, seed=0), epochs=20,
              callbacks=[privacy.PrivacyCallback()])
    print(privacy.statement(model))

TensorFlow backend (the per-example gradient engine is TensorFlow code).
"""

from autoinit_tf.privacy.accounting import (  # noqa: F401
    calibrate_noise_multiplier,
    compute_epsilon,
    dp_sgd_event,
    steps_per_epoch,
)
from autoinit_tf.privacy.sampling import PoissonSampler, poisson_batches  # noqa: F401
