"""largebatch: LAMB, LARS and the large-batch recipes of You et al. (ICLR 2020) for PyTorch."""

__version__ = "0.1.0"
