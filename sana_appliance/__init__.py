"""sana-appliance: full-rank Sana fine-tuning in one container."""

__version__ = "0.1.0"
