"""Training recipes: DCLS (position groups, clamping, repulsive loss, position monitor) and FlexConv (mask groups,
anti-aliasing loss) and the continuous-kernel papers' L2 penalty.

EMA needs nothing special: shared positions are one tensor in the state dict, so ``timm.utils.ModelEmaV3`` updates
each of them once per step.
"""
from .groups import dcls_param_groups, special_param_groups
from .monitor import PositionMonitor
from .penalty import L2PenaltyRecipe, l2_penalty
from .recipe import CompositeRecipe, DclsRecipe, FlexConvRecipe
from .repulsive import repulsive_loss, repulsive_term
