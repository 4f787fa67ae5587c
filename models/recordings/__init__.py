"""Users' recordings: read, localised, calibrated from, written.

``recording`` reads them a chunk of frames at a time, ``predict`` runs a detector on
them, ``calibration`` estimates the simulator's microscope from one, ``outputs`` writes
output files whole or not at all.
"""
