"""HERBS (METHODS.md §3): feature pyramid, background suppression and high-temperature refinement on any backbone.

``build_herbs(backbone, num_classes, cfg.herbs, input_size) -> (HERBS, HERBSObjective)`` wraps any
``Backbone`` (CNN maps or transformer tokens). Parts: ``fpn`` (projection, top-down and bottom-up paths
with interpolation / pooling, so any input size), ``selector`` (top-K_i tokens per stage, vectorised),
``combiner`` (graph combiner), ``objective`` (merged, layer, dropped, refinement terms), ``explain``
(pictures for ``c2f explain``).

Input sizes: the official combiner pools the kept tokens with a Linear over the token axis, so it needs
the same number of kept tokens at every call. Here ``combiner_pool: linear`` (the default, official)
is built for ``input_size``; at another size it works only when ``num_selects`` are counts (the total
stays fixed), and otherwise raises a ModelError. ``combiner_pool: attention`` (learned-query attention
pooling) accepts any token count, so fractions follow the input size.
"""

from coarse2fine.herbs.combiner import GraphCombiner
from coarse2fine.herbs.fpn import FeatureFusion, TokenClassifier, resize_tokens, to_tokens
from coarse2fine.herbs.model import HERBS, build_herbs
from coarse2fine.herbs.objective import HERBSObjective, temperature_at
from coarse2fine.herbs.selector import Selection, Selector

__all__ = [
    "HERBS",
    "FeatureFusion",
    "GraphCombiner",
    "HERBSObjective",
    "Selection",
    "Selector",
    "TokenClassifier",
    "build_herbs",
    "resize_tokens",
    "temperature_at",
    "to_tokens",
]
