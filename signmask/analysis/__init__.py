"""signmask.analysis: the measurements of the lottery-ticket papers, for any model.

Every function takes models pruned by signmask (``<name>_orig`` + ``<name>_mask`` + hook), by
``torch.nn.utils.prune``, or dense, validates its input before changing anything, and leaves
the models it reads untouched.

Linear mode connectivity (Frankle et al. 2020; AWS)::

    from signmask import analysis
    b = analysis.barrier(solution, transferred, test_loader, train_loader=train_loader)
    b.barrier, b.stable                        # max error on the path - mean of the endpoints
    analysis.instability(model_at_k, train, test_loader, train_loader=train_loader)

:func:`interpolate` builds one point of the path, :func:`reestimate_bn` re-estimates BatchNorm
statistics, :func:`evaluate` gives ``(loss, error)``.

Sanity checks (Ma et al. 2021): :func:`random_reinit` (same mask, new init), :func:`random_prune`
(same per-layer counts, random positions), :func:`equal_width` with :func:`count_params` (a
dense network of equal size), and :func:`verdict` ("jackpot", "secondary prize", "no prize").

Weight correlation (Liu et al. 2021): :func:`weight_correlation` gives R_p per layer and overall.

Early phase (Frankle et al. 2020): :class:`Telemetry` records sign changes, distances and
cosine similarities to init and final weights; :func:`perturb` rewrites the rewind point's
weights (signs or magnitudes from init, permutations, same-sign shuffles, Gaussian noise).

Figures (matplotlib, imported only when plotting): :func:`plot_interpolation`,
:func:`plot_sparsity_accuracy`, :func:`plot_telemetry`.
"""

from ._baselines import Verdict, count_params, equal_width, random_prune, random_reinit, verdict
from ._connectivity import Barrier, barrier, instability
from ._bn_stats import reestimate_bn
from ._evaluation import Evaluation, evaluate
from ._interpolation import interpolate
from ._correlation import Correlation, weight_correlation
from ._perturb import PERTURBATIONS, Perturbation, PerturbationInput, perturb, register_perturbation
from ._plots import plot_interpolation, plot_sparsity_accuracy, plot_telemetry
from ._telemetry import Record, Stats, Telemetry

__all__ = [
    "PERTURBATIONS",
    "Barrier",
    "Correlation",
    "Evaluation",
    "Perturbation",
    "PerturbationInput",
    "Record",
    "Stats",
    "Telemetry",
    "Verdict",
    "barrier",
    "count_params",
    "equal_width",
    "evaluate",
    "instability",
    "interpolate",
    "perturb",
    "plot_interpolation",
    "plot_sparsity_accuracy",
    "plot_telemetry",
    "random_prune",
    "random_reinit",
    "reestimate_bn",
    "register_perturbation",
    "verdict",
    "weight_correlation",
]
