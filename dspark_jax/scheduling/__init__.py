"""DSpark verify-length scheduling: Algorithm 1 / §5.2 policies and STS calibration."""

from dspark_jax.scheduling.calibration import (DEFAULT_STS_GRID, auroc, brier, calibration_report,
                                               cumulative_confidence, ece, fit_sts, prefix_labels,
                                               prior_confidence, reliability_diagram)
from dspark_jax.scheduling.scheduler import (POLICIES, Scheduler, calibrate_confidence,
                                             propose_pays, schedule_verify, survival)

__all__ = [
    "DEFAULT_STS_GRID", "POLICIES", "Scheduler", "auroc", "brier", "calibrate_confidence",
    "calibration_report", "cumulative_confidence", "ece", "fit_sts", "prefix_labels", "prior_confidence",
    "propose_pays", "reliability_diagram", "schedule_verify", "survival",
]
