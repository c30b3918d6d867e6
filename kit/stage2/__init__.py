"""Stage 2, the classifier's input: vertebra crops (geometry, slice targets from boxes, the crop store)."""
