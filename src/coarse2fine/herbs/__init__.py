"""HERBS (SPEC 3): feature pyramid, background suppression and high-temperature refinement on any backbone."""

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
