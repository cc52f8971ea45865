"""Training students on image sets and judging the sets: networks, protocols, augmentations, the training loop,
and set quality against real images. Pure torch: no Ray."""
