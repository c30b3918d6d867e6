"""Evaluation: the competition metric, OOF tables and baselines, calibration, plots, reports, explanations."""
