"""PyTorch datasets over the factory's stores, training targets and augmentations.

Store-backed datasets (``datasets``), the training targets of the detector families and
their decoders (``targets``), and the flips that respect the laser scan (``augment``).
"""
