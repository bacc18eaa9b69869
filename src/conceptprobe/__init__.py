"""conceptprobe: how pretrained language models encode and decode concepts in context."""

__version__ = "0.1.0"
