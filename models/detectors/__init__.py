"""Detectors: the one contract (``base``), the registry of families (``registry``),
TrackPy as a detector (``trackpy``), and safe loading of weight files (``weights``).
The networks themselves are in ``models.networks``."""
