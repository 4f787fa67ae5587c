"""Evaluation: localisation metrics (``metrics``), the evaluator of stores
(``evaluate``), stacks (``volumes``), per-particle scores on fields (``fields``) and the
demo report (``report``)."""
