"""herd: the Llama 3 herd of models, rebuilt for researchers."""

__version__ = "0.1.0"
