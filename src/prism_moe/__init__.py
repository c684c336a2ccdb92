"""prism-moe: collaborative MoE serving across heterogeneous edge servers."""

__version__ = "0.1.0"
