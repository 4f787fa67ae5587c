"""Tracking: scan timing, linking, and diffusion coefficients per track.

Scan timing and time stamps (``timing``), linking and tracks (``tracks``), diffusion
coefficients per track (``diffusion``).
"""
