"""Tracking: scan timing and time stamps (``timing``), linking and tracks (``tracks``),
diffusion coefficients per track (``diffusion``)."""
