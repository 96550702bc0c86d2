"""largebatch: LAMB, LARS and the large-batch recipes of You et al. (ICLR 2020) for PyTorch."""

from largebatch.optim import OPTIMIZERS, Lamb, Lars, create_optimizer, param_groups

__version__ = "0.1.0"

__all__ = ["Lamb", "Lars", "param_groups", "create_optimizer", "OPTIMIZERS", "__version__"]
