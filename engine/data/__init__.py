"""Reading a labelled image source into rows and images: the row contract, one reader per source format, the
train/val/test splits, image decoding and reading chosen rows back. Pure: no Ray."""
