"""Embeddings (SPEC §3.5): model loading, window preprocessing, extraction, the keyed cache.

The stage is `extract_embeddings`; its parts live in one module each:

- `models`: resolve a backbone offline, check its weights, load it, choose the device.
- `preprocess`: bands, scaling to [0, 1] (percentiles once per raster), one window to input.
- `cache`: the keyed Parquet cache of patch keys and float32 vectors, and its metadata.
- `extract`: the cache lookup and the batched computation of what is missing, in this process
  (a torch DataLoader) or on Dask workers (`workers`), which send vectors back to be cached.
"""

from patchbalance.embeddings.cache import (
    CACHE_FORMAT,
    CACHE_METADATA_KEY,
    COMPARED_METADATA,
    EmbeddingCache,
    cache_metadata,
)
from patchbalance.embeddings.extract import (
    EmbeddingResult,
    extract_embeddings,
    extraction_text,
)
from patchbalance.embeddings.models import (
    EFFICIENTNET_DIM,
    EFFICIENTNET_ID,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    ModelSource,
    autocast,
    autocast_dtype,
    check_model_available,
    choose_device,
    effective_pooling,
    embedding_dim,
    load_backbone,
    normalisation,
    resolve_model,
    weights_sha256,
)
from patchbalance.embeddings.preprocess import (
    RasterScaling,
    WindowDataset,
    percentile_range,
    preprocess_window,
    raster_scaling,
    select_bands,
)
from patchbalance.embeddings.workers import CLUSTER_PARTITION_WINDOWS

__all__ = [
    "CACHE_FORMAT",
    "CACHE_METADATA_KEY",
    "CLUSTER_PARTITION_WINDOWS",
    "COMPARED_METADATA",
    "EFFICIENTNET_DIM",
    "EFFICIENTNET_ID",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "EmbeddingCache",
    "EmbeddingResult",
    "ModelSource",
    "RasterScaling",
    "WindowDataset",
    "autocast",
    "autocast_dtype",
    "cache_metadata",
    "check_model_available",
    "choose_device",
    "effective_pooling",
    "embedding_dim",
    "extract_embeddings",
    "extraction_text",
    "load_backbone",
    "normalisation",
    "percentile_range",
    "preprocess_window",
    "raster_scaling",
    "resolve_model",
    "select_bands",
    "weights_sha256",
]
