"""Training: the strict config, the run folder and the trainer.

``config`` is ``TrainConfig``, ``runs`` the run folder a training writes, ``train``
``fit`` and ``train`` (`factory train` in one call).
"""
