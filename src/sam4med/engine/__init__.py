"""The shared engine: model registry, predictor, prompts, everything mode, metrics and data."""
