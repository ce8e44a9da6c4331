"""Single source of the package version and the wire protocol version."""

__version__ = "0.1.0"

#: Bumped whenever the frame layout in :mod:`wkr_serving.client.protocol` changes.
PROTOCOL_VERSION = 1
