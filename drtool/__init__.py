"""drtool: backup, disaster recovery and data lifecycle for BSV Teranode nodes."""

__version__ = "0.1.0"
