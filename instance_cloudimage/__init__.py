"""instance-cloudimage: a Ganeti OS provider for distribution cloud images."""

__version__ = "0.1.0"
