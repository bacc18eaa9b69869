"""Train small transformers on synthetic concept tasks and watch concepts and induction heads emerge.

- :mod:`~conceptprobe.tasks.synthetic_data`: the generators (mixture of sparse linear regressions; token
  sequences with repeated segments). numpy only, so the task registry can import them cheaply.
- :mod:`~conceptprobe.training.model`: GPT-2 / Llama models from transformers' configs (real-valued
  read-in and read-out for regression; an attention-only variant for induction).
- :mod:`~conceptprobe.training.trainer`: the training config (YAML presets in ``probes/train-*.yaml``),
  AdamW, seeded data, safetensors checkpoints, resume.
- :mod:`~conceptprobe.training.tracking`: the measures taken at every checkpoint.
- :mod:`~conceptprobe.training.figures`: the report (``report.html`` + ``report.md``).

This package imports nothing heavy at import time.
"""
