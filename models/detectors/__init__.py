"""Detectors: the contract, the registry of families, TrackPy, safe weight loading.

``base`` is the one contract every detector meets, ``registry`` the families (TrackPy
and every network) and ``NetDetector``, ``trackpy`` TrackPy on images and stacks,
``weights`` the safe loading of weight files.  The networks are in ``models.networks``.
"""
