"""Per-class quantization: the weighted quantizer (faiss or torch Lloyd, CLVQ), its transport distances, the
real-image baselines picked beside it, and the retryable class task that runs them on one class. Pure: no Ray."""
