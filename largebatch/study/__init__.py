"""Studies: sweeps of training runs into a SQLite store, reports, and the measurements behind them.

==================  ===========================================================================
module              what
==================  ===========================================================================
``sweep.py``        a TOML grid (task x optimizer x batch x LR x weight decay x warmup) expanded
                    into runs and executed, resumably, in this or spawned worker processes
``store.py``        the SQLite result store: one row per run keyed by its configuration's hash
``report.py``       Markdown tables and PNG plots from a store (``largebatch report``)
``grids.py``        the paper's LR and weight-decay grids by name
``noise.py``        the gradient noise scale B_simple (McCandlish et al. 2018)
``synthetic.py``    layers with smoothness 1e-3 .. 1e2: the convergence theory in one picture
``demo.py``         the bundled demo (``largebatch demo``)
==================  ===========================================================================

Example::

    from largebatch.study import SweepSpec, run_sweep, write_report

    spec = SweepSpec.from_toml("studies/mnist_scaling.toml")
    run_sweep(spec, "runs/mnist-scaling.sqlite", threads=1)
    write_report("docs/results/mnist-scaling", db="runs/mnist-scaling.sqlite")
"""

from largebatch.study.grids import GRIDS, resolve_grid
from largebatch.study.noise import NoiseProbe, NoiseScale, measure_noise_scale, noise_scale_from_norms
from largebatch.study.report import load_study, write_report
from largebatch.study.store import ResultStore, RunRecord
from largebatch.study.sweep import SweepSpec, execute_run, run_sweep
from largebatch.study.synthetic import LayeredQuadratic, run_synthetic

__all__ = [
    "GRIDS", "resolve_grid", "NoiseProbe", "NoiseScale", "measure_noise_scale", "noise_scale_from_norms",
    "load_study", "write_report", "ResultStore", "RunRecord", "SweepSpec", "execute_run", "run_sweep",
    "LayeredQuadratic", "run_synthetic",
]  # fmt: skip
