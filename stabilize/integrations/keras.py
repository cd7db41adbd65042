"""The Keras integration: what ``keras_guard`` and the trainer's Keras path are made of.

* :class:`GuardedOptimizer` (:mod:`.keras_optimizer`): the registered,
  serializable optimizer whose ``apply`` forms the commit decision on the device.
* :func:`keras_guard` / :class:`StabilizeGuard` (:mod:`.keras_guard`): the
  ``model.fit`` callback that runs the policy between steps.
* :class:`KerasTrainStep` / :class:`KerasUpdater` (:mod:`.keras_updater`): the
  same step for :class:`~stabilize.StabilityTrainer`.
"""

from .keras_guard import StabilizeGuard, keras_guard
from .keras_optimizer import GuardedOptimizer, Protected, StepState
from .keras_updater import KerasTrainStep, KerasUpdater

__all__ = ["GuardedOptimizer", "KerasTrainStep", "KerasUpdater", "Protected", "StabilizeGuard", "StepState", "keras_guard"]
