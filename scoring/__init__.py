"""Scoring methods: one module per method; see pipeline/method.py for the shape of each."""
