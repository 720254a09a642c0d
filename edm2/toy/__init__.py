"""The 2D toy example of the autoguidance paper (Karras et al. 2024, Figure 1 and Appendix C).

The toy's constants (tree geometry, random-number order, model, training and sampling settings) are taken
as facts from the paper and its release (NVlabs/edm2, toy_example.py) and checked against parity fixtures
made with it; no code of the release is used here.

* `mixture`: `gt(classes)`, the exact ground truth, a Gaussian mixture shaped as two fractal trees
  (class 'A', class 'B', or their union 'AB'), with exact density and score at every noise level sigma.
* `model`: `ToyModel`, an MLP of magnitude-preserving layers that predicts log p(x; sigma); its score is
  the gradient by autodiff; `save_model` / `load_model`; `release_model` for the release's weights.
* `training`: `train()`, exact score matching against the ground truth with a power-function EMA.
* `sampling`: `heun_sample()`, guidance (`guided_score`, with any rule of `edm2.guidance_rules`), the
  idealised models (`SmoothedGT`, `ideal_models()`), `sample_methods()`, the five panels of Figure 1, and
  `sample_rules()`, autoguidance under several guidance rules at one weight.
* `evaluation`: `evaluate()`, outlier rate, leaf-branch coverage, branch TV and log-likelihood.
* `reference`: the release procedure's results on seeds 0-2 (reference data with its provenance) and the
  checks of what holds on every one of them.
"""

from edm2.toy.evaluation import evaluate, outlier_level
from edm2.toy.mixture import CLASSES, GaussianMixture, ToyError, gt
from edm2.toy.model import (SIGMA_DATA, ToyModel, ToyModelError, from_release_state_dict, load_model,
                            release_model, save_model)
from edm2.toy.reference import release_models, release_results, seed_checks
from edm2.toy.sampling import (IDEAL_GUIDE_BLUR, IDEAL_MAIN_BLUR, METHODS, GuidedScore, SmoothedGT, guided_score,
                               heun_sample, ideal_models, sample_methods, sample_rules)
from edm2.toy.training import (ITERATION_BYTES, ema_beta, learning_rate, make_optimizer, sample_bytes, score_matching_loss,
                               train, train_step, training_bytes)

__all__ = ['CLASSES', 'GaussianMixture', 'GuidedScore', 'IDEAL_GUIDE_BLUR', 'IDEAL_MAIN_BLUR', 'METHODS', 'SIGMA_DATA',
           'SmoothedGT', 'ToyError', 'ToyModel', 'ToyModelError', 'ema_beta', 'evaluate', 'from_release_state_dict',
           'gt', 'guided_score', 'heun_sample', 'ideal_models', 'learning_rate', 'load_model', 'make_optimizer',
           'outlier_level', 'release_model', 'release_models', 'release_results', 'sample_methods', 'sample_rules',
           'save_model', 'score_matching_loss', 'seed_checks', 'train', 'train_step', 'ITERATION_BYTES', 'training_bytes',
           'sample_bytes']
