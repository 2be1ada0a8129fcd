"""Metrics: one module per family.

- ``standard``: FID / KID / Inception Score math on precomputed features (torchmetrics where it exists)
- ``inception``: the single-pass InceptionV3 feature extractor (pool3 + logits)
- ``diversity``: precision/recall, density/coverage, Vendi, within-class distance (our own, oracle-tested)
- ``eval_classifier`` / ``classifier``: the evaluation classifier and the metrics read off it
- ``feature_cache``: on-disk cache of real-data features
"""
