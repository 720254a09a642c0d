"""Benchmark of the metric detectors and the Fréchet distance.

Measures, with full-size architectures and random weights (speed does not depend on the values):
  - images/s of the FID Inception-v3 and of DINOv2 ViT-L/14 (with its preprocessing) at a given batch,
  - the share of that time spent accumulating float64 statistics (mu, Sigma),
  - the time of the Fréchet distance between two 2048-d (and 1024-d) statistics,
and prints them with the machine and settings, plus ratios measured in the same run.

    python bench/metrics.py                     # batch 64, CPU
    python bench/metrics.py --device cuda --iters 5
"""

import argparse
import os
import time

import numpy as np
import torch

from edm2.metrics.detectors import Detector
from edm2.metrics.dinov2 import DINOv2ViT
from edm2.metrics.frechet import frechet_distance
from edm2.metrics.inception import InceptionV3FID
from edm2.metrics.stats import FeatureStats
from machine import cpu_model  # bench/machine.py


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_detector(det, images, iters, device):
    det(images[:2])  # warm-up (allocations, kernel selection)
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        det(images)
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def time_stats(dim, batch, iters, device):
    f = torch.randn(batch, dim, device=device)
    stats = FeatureStats(dim, device=device)
    stats.update(f)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        stats.update(f)
    sync(device)
    return (time.perf_counter() - t0) / iters


def time_frechet(dim, n, iters):
    rng = np.random.RandomState(0)
    mus, sigmas = [], []
    for _ in range(2):
        f = rng.randn(n, dim) @ (rng.randn(dim, dim) / np.sqrt(dim))
        mus.append(f.mean(0))
        sigmas.append(np.cov(f, rowvar=False))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        frechet_distance(mus[0], sigmas[0], mus[1], sigmas[1])
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--iters', type=int, default=1, help='timed batches per detector (best is reported)')
    parser.add_argument('--resolution', type=int, default=512, help='input image size (uint8)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch default)')
    parser.add_argument('--detectors', default='inception,dinov2')
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f'machine: {cpu_model()}, {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f}')
    print(f'torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}'
          + (f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''))
    print(f'settings: batch {args.batch}, input {args.resolution}x{args.resolution} uint8, best of {args.iters}, '
          f'random full-size weights')
    images = torch.randint(0, 256, (args.batch, 3, args.resolution, args.resolution), dtype=torch.uint8,
                           device=device)

    rates = {}
    for name in args.detectors.split(','):
        torch.manual_seed(0)
        net = InceptionV3FID() if name == 'inception' else DINOv2ViT()  # ViT-L/14: width 1024, depth 24, 16 heads
        det = Detector(name, net, weights_path=os.devnull, device=device)
        with torch.no_grad():
            t = time_detector(det, images, args.iters, device)
        t_stats = time_stats(det.feature_dim, args.batch, 3, device)
        rates[name] = args.batch / t
        print(f'{name:<10} {rates[name]:8.2f} images/s  ({t:.2f} s per batch of {args.batch}); '
              f'float64 mu/Sigma update {t_stats * 1e3:.1f} ms per batch = {100 * t_stats / t:.2f}% of the detector')
    if len(rates) == 2:
        print(f'ratio inception / dinov2 images/s: {rates["inception"] / rates["dinov2"]:.2f}')

    for dim in (2048, 1024):
        t = time_frechet(dim, n=3 * dim, iters=3)
        print(f'Fréchet distance, {dim}-d statistics: {t:.2f} s (scipy.linalg.sqrtm, best of 3)')


if __name__ == '__main__':
    main()
