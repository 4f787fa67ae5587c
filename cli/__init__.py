"""The `factory` command line: the layer above factory, loaders and models.

Commands parse and validate their arguments, then call one library function; every
user error becomes one line on stderr and exit status 2.
"""
