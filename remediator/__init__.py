"""remediator: automatic noisy-neighbour remediation for Linux service hosts."""

__version__ = "0.1.0"
