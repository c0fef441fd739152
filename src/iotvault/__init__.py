"""iotvault: a self-hosted, secure back end for IoT applications."""

__version__ = "0.1.0"
