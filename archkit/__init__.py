"""archkit: config-driven architecture search for hybrid language models that sleep."""

__version__ = "0.1.0"
