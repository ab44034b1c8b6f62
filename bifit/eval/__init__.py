"""Evaluation metrics: DAVIS J/F (Ref-DAVIS17, also what the Ref-YouTube-VOS server reports) and the
A2D-Sentences / JHMDB-Sentences metrics, bit-compatible with the official evaluation code."""

from bifit.eval import a2d, davis

__all__ = ["a2d", "davis"]
