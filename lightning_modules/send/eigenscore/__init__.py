"""EigenScore (INSIDE, Chen et al. 2024), exact and efficient: pure tensor math, importable without Lightning.

``score.py`` holds the public functions and chooses among the estimators; ``slq.py`` and ``kpm.py`` are the
estimators, ``deflation.py`` splits off outlier directions, ``covariance.py`` is the operator they share. The
maths, the error control and the measured accuracy: docs/send.md, Efficient EigenScore.
"""

from neurolight.lightning_modules.send.eigenscore.score import (
    EigenScoreEstimate,
    chebyshev_polynomials,
    efficient_eigenscore,
    eigenscore,
    jackson_damping,
    seeded_generator,
    spectral_upper_bound,
)

__all__ = [
    "EigenScoreEstimate",
    "chebyshev_polynomials",
    "efficient_eigenscore",
    "eigenscore",
    "jackson_damping",
    "seeded_generator",
    "spectral_upper_bound",
]
