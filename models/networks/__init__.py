"""The network families: building blocks, and one module per family."""
