"""sam4med: Segment Anything for medical images.

One engine (``sam4med.engine``: models, data, prompts, predictor, metrics) and one package per
method (``sam4med.evaluation``; ``sam4med.samaug`` and ``sam4med.samunet`` follow).
"""

__version__ = "0.1.0"
