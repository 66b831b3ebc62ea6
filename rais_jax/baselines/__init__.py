"""The methods RAIS is compared with, each a :class:`rais_jax.Sampler` factory.

* :func:`naive_sampler`: p ∝ the last measured gradient norm (the ablation of
  RAIS's robust set);
* :func:`loss_sampler`: p ∝ the last loss (Katharopoulos & Fleuret, 2018);
* :func:`selective_backprop`: backpropagate the high-loss candidates (Jiang
  et al., 2019);
* :func:`infobatch`: prune well-learned examples each epoch (Qin et al., 2024).

They run on the same step as RAIS (:func:`rais_jax.make_runner`), so that a
comparison differs only by the method.
"""

from rais_jax.baselines.info_batch import infobatch
from rais_jax.baselines.loss_is import loss_sampler
from rais_jax.baselines.naive import naive_sampler
from rais_jax.baselines.selective import selective_backprop

__all__ = ["infobatch", "loss_sampler", "naive_sampler", "selective_backprop"]
