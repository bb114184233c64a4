"""Weights: deltas between models, selections of channels and heads, and their suppression."""
