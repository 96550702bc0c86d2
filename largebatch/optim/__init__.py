"""The LAMB/LARS family and parameter-group helpers."""

from largebatch.optim._common import trust_ratio
from largebatch.optim.groups import param_groups
from largebatch.optim.lamb import Lamb, lamb
from largebatch.optim.lars import Lars, lars
from largebatch.optim.registry import OPTIMIZERS, create_optimizer

__all__ = ["Lamb", "Lars", "lamb", "lars", "param_groups", "trust_ratio", "OPTIMIZERS", "create_optimizer"]
