"""The Ray layer: the only package of engine/ that imports ray. It places the pure stages on a cluster."""
