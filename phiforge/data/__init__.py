"""Data pipeline: curation, synthesis and packing of training corpora."""
