"""Trainer callbacks the multi-process tests install through the `callbacks` config key
(`trainer_helpers.callbacks(...)` builds the override): fault injection (`faults`), the
per-rank results writer (`results`) and known answers for evaluation (`oracle`)."""
