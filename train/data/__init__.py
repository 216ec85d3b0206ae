"""The data pipeline: Debian sound sources → labelled clips → mixed scenes with strong labels →
questions, negatives and preference pairs. Stages (``train.sft``, ``train.dpo``, …) read only what
this package writes."""
