"""Differentially private training (DP-SGD) for Keras 3, with dp-accounting privacy figures.

    from autoinit_tf import privacy
    model = privacy.make_private(model, l2_norm_clip=1.0, target_epsilon=3.0, target_delta=1e-5,
                                 batch_size=256, dataset_size=60_000, epochs=20)
    model.compile(optimizer="sgd", loss=..., metrics=[...])
    model.fit(privacy.poisson_batches(x, y, batch_size=256, seed=0), epochs=20,
              callbacks=[privacy.PrivacyCallback()])
    print(privacy.statement(model))

Keras backends: TensorFlow (per-example engine in :mod:`autoinit_tf.privacy.per_example`, train
step in :mod:`autoinit_tf.privacy.tf_step`) and JAX (``jax.vmap`` per-example gradients,
:mod:`autoinit_tf.privacy.jax_step`); other backends get a clear error.
"""

from autoinit_tf.privacy.accounting import (  # noqa: F401
    calibrate_noise_multiplier,
    compute_epsilon,
    dp_sgd_event,
    steps_per_epoch,
)
from autoinit_tf.privacy.sampling import PoissonSampler, poisson_batches  # noqa: F401
from autoinit_tf.privacy.model import make_private, per_example_gradients  # noqa: F401
from autoinit_tf.privacy.validators import (  # noqa: F401
    EXAMPLE_MIXING_LAYERS,
    DataDependentLossError,
    ExampleMixingLayerError,
    check_example_independence,
    find_example_mixing_layers,
    register_example_mixing_layer,
)
from autoinit_tf.privacy.per_example import (  # noqa: F401
    PerExampleGradients,
    clip_per_example,
    global_norms,
)
from autoinit_tf.privacy.ema import ema_values, ema_weights  # noqa: F401
from autoinit_tf.privacy.augment import random_flip_and_crop  # noqa: F401
from autoinit_tf.privacy.statement import PrivacyStatement, epsilon, statement  # noqa: F401
from autoinit_tf.privacy.callback import PrivacyCallback  # noqa: F401
