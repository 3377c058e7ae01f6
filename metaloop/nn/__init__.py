"""Every network of metaloop and its building blocks; imports only torch.

- :mod:`~metaloop.nn.conv4`: the 4-block conv net, once: :class:`Conv4`, :func:`conv4_backbone`,
  :class:`PerStepConv4` (MAML++), and the block learn2learn's layout below is made of.
- :mod:`~metaloop.nn.mlp`: :class:`MLP`, the sinusoid regression net.
- :mod:`~metaloop.nn.context`: CAVIA's :class:`ContextMLP` and :class:`FiLMConv4`.
- :mod:`~metaloop.nn.vision`: learn2learn's vision models under their names and parameter names
  (``CNN4``, ``OmniglotCNN``, ResNet-12, WRN-28-10), so its state dicts load.
- :mod:`~metaloop.nn.per_step`: MAML++'s per-step BatchNorm.
- :mod:`~metaloop.nn.kronecker`, :mod:`~metaloop.nn.layers`, :mod:`~metaloop.nn.metalayers`,
  :mod:`~metaloop.nn.plain_norms`: Kronecker-factored maps, small layers, metalayers, exact norms.
- :mod:`~metaloop.nn.prototypical`, :mod:`~metaloop.nn.svm`: the few-shot heads
  (:class:`PrototypicalClassifier`, :class:`SVClassifier`) fitted on each task's support set.

:mod:`metaloop.transforms` builds gradient transforms from the Kronecker modules; the learners of
:mod:`metaloop.lightning` run these networks.
"""

from __future__ import annotations

from metaloop.nn import context, conv4, kronecker, layers, metalayers, mlp, per_step, svm, vision
from metaloop.nn.context import *  # noqa: F403
from metaloop.nn.conv4 import *  # noqa: F403
from metaloop.nn.kronecker import *  # noqa: F403
from metaloop.nn.layers import *  # noqa: F403
from metaloop.nn.metalayers import *  # noqa: F403
from metaloop.nn.mlp import *  # noqa: F403
from metaloop.nn.per_step import *  # noqa: F403
from metaloop.nn.plain_norms import exact_norms
from metaloop.nn.prototypical import PrototypicalClassifier, compute_prototypes, prototype_logits
from metaloop.nn.svm import *  # noqa: F403
from metaloop.nn.vision import *  # noqa: F403

# each submodule's public names, listed once in the submodule; of the norms and prototypes, the entry points
__all__ = [
    *(name for module in (conv4, mlp, context, vision, per_step, kronecker, layers, metalayers, svm) for name in module.__all__),
    "exact_norms",
    "compute_prototypes",
    "prototype_logits",
    "PrototypicalClassifier",
]
