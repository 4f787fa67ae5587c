"""Evaluation: scoring detectors against a store's truth, in micrometres.

Localisation metrics (``metrics``), both sides of a score in um (``truth``), choosing
a detector on validation data (``tuning``), the evaluator of test stores of images,
movies and stacks (``evaluate``), per-particle scores on fields (``fields``) and the
report of a runs folder (``report``).
"""
