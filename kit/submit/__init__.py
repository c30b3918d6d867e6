"""Submission: loading runs, predicting a study, the writer (fallbacks, deadline), read-ahead, export."""
