"""Exact-score toy analyses (Zhao & Schwing 2025) on analytic mixtures."""
