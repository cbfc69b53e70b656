"""Defaults every verb shares, in a module that imports nothing, so the command line can name them
without loading PyTorch and segment_anything first."""

# The model every verb uses unless told otherwise: LiteMedSAM's box masks exactly (a box alone goes to
# LiteMedSAM's own decoder), and clicks and corrections besides.
DEFAULT_MODEL = "litemedsam-click"
