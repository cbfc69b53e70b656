"""SAMAug: SAM everything-mode priors as input augmentation for standard segmenters."""
