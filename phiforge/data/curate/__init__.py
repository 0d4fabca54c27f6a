"""Corpus curation: heuristic filters, educational-value classifier, exact/MinHash dedup, decontamination.

Entry points: `pipeline.run_curate(load_config(yaml), inputs, out_dir)` (the `phiforge curate` command),
`classifier.train_classifier` / `load_classifier` / `ensure_default_classifier`, `annotate.annotate`,
`minhash.minhash_signatures` / `near_duplicate_clusters`, `decontam.benchmark_texts` / `NgramIndex`.
"""
