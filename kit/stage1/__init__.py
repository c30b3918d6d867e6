"""Stage 1, finding C1-C7: the input recipes of the segmenter and the level model, and running them over studies."""
