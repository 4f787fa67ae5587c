"""Training: the strict config (``config``), the run folder (``runs``) and the trainer
(``train``)."""
