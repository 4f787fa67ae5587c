"""Users' recordings: reading them a chunk at a time (``recording``), running a
detector on them (``predict``), calibrating the simulator from them (``calibration``),
and writing outputs whole or not at all (``outputs``)."""
