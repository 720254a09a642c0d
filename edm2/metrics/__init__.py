"""Metrics of generated images: FID, FD_DINOv2, precision and recall, and the ADM evaluator's metrics.

    detectors         weight files (explicit path, env var, cache, download) and uint8 -> features
    inception         the FID Inception-v3 with the TF 2015-12-05 graph's quirks
    dinov2            the DINOv2 ViT and the FD_DINOv2 preprocessing
    stats             mean / covariance in float64, summed over torchrun ranks
    frechet           Fréchet distance
    precision_recall  k-NN precision and recall in blocks
    reference         reference statistics files (safe pickle, EDM1 .npz)
    evaluate          metric names, feature accumulation, metric values
    adm               the ADM evaluator's protocol: adm_fid, sfid, is, adm_precision, adm_recall
    adm_npz           ADM batch files (.npz): safe reading, streaming atomic writing
    inception_score   Inception Score in contiguous splits
    adm_precision_recall  precision/recall with float16 block distances (float32 fallback)
"""

from .detectors import Detector, DetectorError, find_weights, load_detector
from .evaluate import METRICS, MetricError, accumulate, compute_metrics, parse_metrics
from .adm_npz import AdmBatch, AdmFileError, NpzImageWriter, SampleBatchSink
from .adm_precision_recall import adm_precision_recall
from .frechet import FrechetError, frechet_distance
from .inception_score import inception_score
from .precision_recall import precision_recall
from .reference import ReferenceFileError, load_reference, save_reference
from .stats import FeatureStats

__all__ = [
    'Detector', 'DetectorError', 'find_weights', 'load_detector',
    'METRICS', 'MetricError', 'accumulate', 'compute_metrics', 'parse_metrics',
    'FrechetError', 'frechet_distance', 'precision_recall',
    'ReferenceFileError', 'load_reference', 'save_reference', 'FeatureStats',
    'AdmBatch', 'AdmFileError', 'NpzImageWriter', 'SampleBatchSink', 'adm_precision_recall', 'inception_score',
]
