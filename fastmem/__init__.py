"""fastmem: a high-throughput trainer for memorization research (random labels, augmentation, k-NN probes)."""

__version__ = "0.1.0"
