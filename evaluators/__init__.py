"""Evaluation room: probes, lm-eval scoring, metric protocols, aggregation and the per-cell harness."""
