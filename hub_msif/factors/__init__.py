"""Fitting EK-FAC factors of one training stage, and the factor folder format (docs/design.md)."""
