"""The DCLS training recipe: parameter groups, clamping, repulsive loss, position monitoring.

EMA needs nothing special: shared positions are one tensor in the state dict, so ``timm.utils.ModelEmaV3`` updates
each of them once per step.
"""
from .groups import dcls_param_groups
from .monitor import PositionMonitor
from .recipe import DclsRecipe
from .repulsive import repulsive_loss, repulsive_term
