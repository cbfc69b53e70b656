"""SAM-UNet: a convolutional branch beside the frozen SAM encoder and a multi-scale fusion decoder."""
