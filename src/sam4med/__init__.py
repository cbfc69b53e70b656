"""sam4med: Segment Anything for medical images.

One engine (``sam4med.engine``: models, data, prompts, predictor, metrics, the training loop and the
resumable item loop) and one package per method built on it: ``sam4med.evaluation`` (the COSMOS
protocol), ``sam4med.samaug`` (SAMAug) and ``sam4med.samunet`` (SAM-UNet).
"""

__version__ = "0.1.0"
