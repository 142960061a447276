"""nemoe: a neuro-evolutionary mixture-of-experts language model trainer."""

__version__ = "0.1.0"
