"""SC-DD engine: self-supervised compression for dataset distillation."""

__version__ = "0.1.0"
