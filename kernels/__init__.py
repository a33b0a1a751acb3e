"""k-NN kernels, installed as `fastmem.kernels`: cosine k-NN classification of embeddings."""

from .knn_torch import knn_classify, knn_topk

__all__ = ["knn_classify", "knn_topk"]
