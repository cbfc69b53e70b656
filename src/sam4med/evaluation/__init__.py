"""Method 1: evaluating SAM-family models on medical images (the COSMOS 1050K protocol)."""
