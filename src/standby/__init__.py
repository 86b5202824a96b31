"""standby: block-level disaster-recovery replication."""

__version__ = "0.1.0"
