"""Benchmark of the metric detectors and the Fréchet distance.

Measures, with full-size architectures and random weights (speed does not depend on the values):
  - images/s of the FID Inception-v3 and of DINOv2 ViT-L/14 (with its preprocessing) at a given batch,
  - the share of that time spent accumulating float64 statistics (mu, Sigma),
  - the time of the Fréchet distance between two 2048-d (FID) and 2023-d (sFID) statistics: scipy's
    sqrtm of Sigma1 Sigma2 (the usual route, kept here as the baseline) against this project's
    eigenvalue route, with the reference's factor computed in the call and cached (`--part frechet`),
  - the extra cost of the ADM evaluator's metrics over FID alone: the Inception pass returning pool
    features, logits and the sFID tap vs pool features only, the extra statistics updates, and the
    one-off sFID Fréchet distance, Inception Score and float16 precision/recall,
and prints them with the machine and settings, plus ratios measured in the same run.

    python bench/metrics.py                     # batch 64, CPU
    python bench/metrics.py --part frechet      # the Fréchet distance only (minutes: 4 on 2 busy CPU cores)
    python bench/metrics.py --device cuda --iters 5 --pr-num 50000,10000
"""

import argparse
import os
import time

import warnings

import numpy as np
import scipy.linalg
import torch

from edm2.metrics.detectors import Detector
from edm2.metrics.dinov2 import DINOv2ViT
from edm2.metrics.adm_precision_recall import adm_precision_recall
from edm2.metrics.frechet import FrechetReference
from edm2.metrics.inception import NUM_CLASSES, SFID_DIM, InceptionV3FID, sfid_features
from edm2.metrics.inception_score import inception_score
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


def random_statistics(dim, n, seed):
    rng = np.random.RandomState(seed)
    f = rng.randn(n, dim) @ (rng.randn(dim, dim) / np.sqrt(dim))
    return f.mean(0), np.cov(f, rowvar=False)


def sqrtm_route(mu1, sigma1, mu2, sigma2):
    """The Fréchet distance as usually computed (baseline): the real part of scipy's sqrtm(Sigma1 Sigma2)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real)


def best_of(fn, iters):
    times, value = [], None
    for _ in range(iters):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return min(times), value


def time_frechet(dim, n, iters):
    """Best-of-`iters` seconds of: the sqrtm route, the eigenvalue route factoring the reference in the
    call, and with the reference's factor already made (the sweep, --repeats); plus the relative difference."""
    (mu1, sigma1), (mu2, sigma2) = random_statistics(dim, n, 0), random_statistics(dim, n, 1)
    t_old, old = best_of(lambda: sqrtm_route(mu1, sigma1, mu2, sigma2), iters)
    t_new, new = best_of(lambda: FrechetReference(mu2, sigma2).distance(mu1, sigma1), iters)
    ref = FrechetReference(mu2, sigma2)
    t_cached, cached = best_of(lambda: ref.distance(mu1, sigma1), iters)
    return dict(old=t_old, new=t_new, cached=t_cached, difference=abs(new - old) / abs(old))


def report_frechet(iters):
    for dim, what in ((2048, 'FID, FD_DINOv2-size'), (SFID_DIM, 'sFID')):
        r = time_frechet(dim, n=3 * dim, iters=iters)
        print(f'Fréchet distance, {dim}-d statistics ({what}), best of {iters}: scipy sqrtm route {r["old"]:.2f} s; '
              f'eigenvalue route {r["new"]:.2f} s factoring the reference ({r["old"] / r["new"]:.1f}x), '
              f'{r["cached"]:.2f} s with its factor cached ({r["old"] / r["cached"]:.1f}x); '
              f'values differ by {r["difference"]:.1e} relative')


def time_adm_extra(det, images, iters, device, num, pr_num):
    """Seconds of the FID-only and the all-ADM-metrics work for `num` images (measured per batch, scaled)."""
    variants = {'fid': ('pool',), 'all': ('pool', 'logits', 'spatial')}
    times = {k: [] for k in variants}
    det.outputs(images[:2], variants['all'])
    for _ in range(max(iters, 3)):  # interleaved, best of each: the ratio survives a busy machine
        for key, names in variants.items():
            sync(device)
            t0 = time.perf_counter()
            det.outputs(images, names)
            sync(device)
            times[key].append(time.perf_counter() - t0)
    t_fid, t_all = min(times['fid']), min(times['all'])
    # The extra operations on their own (best of 20; robust where the machine is shared): the logits'
    # matrix product and the sFID tap's copy in (H, W, C) order.
    pool = torch.randn(images.shape[0], det.feature_dim, device=device)
    tap = torch.randn(images.shape[0], det.net.Mixed_6d.branch1x1.conv.out_channels, 17, 17, device=device)
    extra_ops = []
    for _ in range(20):
        sync(device)
        t0 = time.perf_counter()
        pool @ det.net.fc.weight.T
        sfid_features(tap)
        sync(device)
        extra_ops.append(time.perf_counter() - t0)
    t_extra_ops = min(extra_ops)
    batch = images.shape[0]
    t_stats_extra = time_stats(SFID_DIM, batch, 3, device) + time_stats(NUM_CLASSES, batch, 3, device)
    (mu1, sigma1), (mu2, sigma2) = (random_statistics(SFID_DIM, 2 * SFID_DIM, seed) for seed in (0, 1))
    t_sfid = best_of(lambda: FrechetReference(mu2, sigma2).distance(mu1, sigma1), 1)[0]  # one-off: factor included
    logits = torch.randn(num, NUM_CLASSES, device=device) * 3
    t0 = time.perf_counter()
    inception_score(logits.cpu().numpy())
    t_is = time.perf_counter() - t0
    n_gen, n_ref = pr_num
    gen = torch.randn(n_gen, det.feature_dim, device=device)
    ref = torch.randn(n_ref, det.feature_dim, device=device)
    t0 = time.perf_counter()
    adm_precision_recall(ref, gen, mode='float16', device=device)
    sync(device)
    t_pr = time.perf_counter() - t0
    return dict(t_fid=t_fid, t_all=t_all, t_extra_ops=t_extra_ops, t_stats_extra=t_stats_extra, t_sfid=t_sfid, t_is=t_is, t_pr=t_pr,
                batch=batch)


def report_adm(r, num, pr_num, pr_full=(50000, 10000)):
    per_image_fid = r['t_fid'] / r['batch']
    per_image_all = (r['t_fid'] + r['t_extra_ops'] + r['t_stats_extra']) / r['batch']
    print(f'ADM metrics: Inception pass with logits + sFID tap {r["t_all"]:.2f} s vs pool only {r["t_fid"]:.2f} s '
          f'per batch of {r["batch"]} (ratio {r["t_all"] / r["t_fid"]:.3f}, interleaved, best of each); the extra '
          f'operations alone {r["t_extra_ops"] * 1e3:.2f} ms = {100 * r["t_extra_ops"] / r["t_fid"]:.3f}% of the pass; '
          f'extra float64 statistics (2023-d sFID, 1008-d logits) {r["t_stats_extra"] * 1e3:.1f} ms per batch '
          f'= {100 * r["t_stats_extra"] / r["t_fid"]:.2f}%')
    print(f'  one-off: sFID Fréchet distance {r["t_sfid"]:.2f} s, Inception Score of {num} images {r["t_is"]:.2f} s, '
          f'float16 precision/recall of {pr_num[0]} samples vs {pr_num[1]} reference {r["t_pr"]:.2f} s')
    # Precision/recall computes (N + M)^2 distances (both radii and both coverages): scaled to the evaluator's sizes.
    t_pr_full = r['t_pr'] * (sum(pr_full) / sum(pr_num)) ** 2
    fid = num * per_image_fid
    extra = num * (per_image_all - per_image_fid) + r['t_sfid'] + r['t_is'] + t_pr_full  # per-image part: ops + stats
    print(f'  for {num} images: FID alone {fid:.0f} s of detector time; sFID + IS + precision/recall '
          f'({pr_full[0]} vs {pr_full[1]}, scaled from the measured size by (N + M)^2: {t_pr_full:.0f} s) add '
          f'{extra:.0f} s = {100 * extra / fid:.1f}%')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--iters', type=int, default=1, help='timed batches per detector (best is reported)')
    parser.add_argument('--resolution', type=int, default=512, help='input image size (uint8)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch default)')
    parser.add_argument('--detectors', default='inception,dinov2')
    parser.add_argument('--num', type=int, default=50000, help='images of one evaluation (ADM extra-cost summary)')
    parser.add_argument('--part', choices=('all', 'detectors', 'frechet'), default='all',
                        help='the detectors (with the ADM extra cost), the Fréchet distance, or both')
    parser.add_argument('--frechet-iters', type=int, default=2, help='timed Fréchet distances per route (best)')
    parser.add_argument('--pr-num', default='5000,2000',
                        help='samples,reference features of the timed ADM precision/recall (evaluator: 50000,10000)')
    args = parser.parse_args()
    pr_num = tuple(int(v) for v in args.pr_num.split(','))

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f'machine: {cpu_model()}, {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f}')
    print(f'torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}'
          + (f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''))
    print(f'settings: batch {args.batch}, input {args.resolution}x{args.resolution} uint8, best of {args.iters}, '
          f'random full-size weights')
    if args.part in ('all', 'detectors'):
        report_detectors(args, device, pr_num)
    if args.part in ('all', 'frechet'):
        report_frechet(args.frechet_iters)


def report_detectors(args, device, pr_num):
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
        if name == 'inception':
            with torch.no_grad():
                report_adm(time_adm_extra(det, images, args.iters, device, args.num, pr_num), args.num, pr_num)
    if len(rates) == 2:
        print(f'ratio inception / dinov2 images/s: {rates["inception"] / rates["dinov2"]:.2f}')


if __name__ == '__main__':
    main()
