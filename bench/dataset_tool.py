"""Benchmark of `dataset_tool.py convert --workers`: images/s with 1 and 2 (or more) workers in one run,
and the peak memory of the command's process and of each worker.

Writes a folder of synthetic ImageNet-like sources (500x375 and 375x500 JPEGs of smooth content plus
noise, every tenth a PNG, in class folders), then runs the real command line in fresh processes,
`--resolution 64x64 --transform center-crop-dhariwal` (ImageNet-64's recipe), once per worker count.
Images/s counts the whole command (start-up included). Resident memory of the process tree is sampled
with psutil every 10 ms. The outputs of all runs are checked to be the same archive (members, order,
bytes). Takes well under two minutes on two cores.

    python bench/dataset_tool.py                    # 4000 images, 1 and 2 workers (about a minute)
    python bench/dataset_tool.py --images 8000 --workers 1,2,4
"""

import os
import subprocess
import sys
import tempfile
import time
import zipfile

import click
import numpy as np
import PIL.Image
import psutil
from machine import cpu_model  # bench/machine.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_sources(folder, count, seed=0):
    """`count` JPEG/PNG images of ImageNet's typical sizes in 10 class folders; returns their total bytes."""
    rng = np.random.RandomState(seed)
    total = 0
    for i in range(count):
        w, h = (500, 375) if i % 3 else (375, 500)
        coarse = PIL.Image.fromarray(rng.randint(0, 256, (h // 25, w // 25, 3), dtype=np.uint8))
        arr = np.asarray(coarse.resize((w, h), PIL.Image.BICUBIC), dtype=np.int16)
        arr = np.clip(arr + rng.randint(-12, 13, arr.shape), 0, 255).astype(np.uint8)
        sub = os.path.join(folder, f'n{i % 10:08d}')
        os.makedirs(sub, exist_ok=True)
        path = os.path.join(sub, f'{i:06d}.' + ('png' if i % 10 == 9 else 'jpg'))
        PIL.Image.fromarray(arr).save(path, quality=90) if path.endswith('jpg') else PIL.Image.fromarray(arr).save(path)
        total += os.path.getsize(path)
    return total


def run_convert(source, dest, workers):
    """Seconds of the command, peak RSS (bytes) of its process and of each worker, and their CPU seconds."""
    cmd = [sys.executable, os.path.join(REPO, 'dataset_tool.py'), 'convert', '--source', source, '--dest', dest,
           '--resolution', '64x64', '--transform', 'center-crop-dhariwal', '--workers', str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    main = psutil.Process(proc.pid)
    peaks, cpu = {}, {}  # pid -> (role, peak rss); pid -> CPU seconds (user + system) last seen
    while proc.poll() is None:
        try:
            procs = [main] + main.children(recursive=True)
            for p in procs:
                cmdline = ' '.join(p.cmdline())
                if 'resource_tracker' in cmdline:
                    continue
                role = 'command' if p.pid == proc.pid else 'worker'
                rss = p.memory_info().rss
                peaks[p.pid] = (role, max(rss, peaks.get(p.pid, (role, 0))[1]))
                times = p.cpu_times()
                cpu[p.pid] = times.user + times.system
        except psutil.Error:  # a process ended between listing and reading
            pass
        time.sleep(0.01)
    seconds = time.perf_counter() - t0
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise click.ClickException(f'convert --workers {workers} failed: {out.strip()}')
    return seconds, peaks, cpu


def members(path):
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


@click.command()
@click.option('--images', type=click.IntRange(10), default=4000, show_default=True, help='source images')
@click.option('--workers', 'worker_list', default='1,2', show_default=True, help='worker counts to time')
def main(images, worker_list):
    counts = [int(v) for v in worker_list.split(',')]
    print(f'Machine: {cpu_model()}, {psutil.cpu_count()} logical CPUs, usable {len(os.sched_getaffinity(0))}, '
          f'load average {os.getloadavg()[0]:.2f} (other processes take cores from the workers)')
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, 'src')
        size = make_sources(source, images)
        print(f'Source: {images} images (500x375 / 375x500 JPEG quality 90, every tenth PNG), '
              f'{size / 2**20:.0f} MiB; convert --resolution 64x64 --transform center-crop-dhariwal')
        rates, archives = {}, []
        for workers in counts:
            dest = os.path.join(tmp, f'out-{workers}.zip')
            seconds, peaks, cpu = run_convert(source, dest, workers)
            rates[workers] = images / seconds
            archives.append(members(dest))
            command = [rss for role, rss in peaks.values() if role == 'command']
            worker_rss = sorted(rss for role, rss in peaks.values() if role == 'worker')
            print(f'--workers {workers}: {rates[workers]:7.1f} images/s ({seconds:.2f} s, start-up included; '
                  f'{rates[workers] / rates[counts[0]]:.2f}x --workers {counts[0]}); peak RSS: command '
                  f'{max(command) / 2**20:.0f} MiB' + (', workers ' + ', '.join(f'{r / 2**20:.0f}' for r in worker_rss)
                                                        + ' MiB' if worker_rss else '') +
                  f'; CPU seconds: command {cpu[min(peaks, key=lambda p: peaks[p][0] != "command")]:.2f}' +
                  (', workers ' + ', '.join(f'{cpu[p]:.2f}' for p in peaks if peaks[p][0] == 'worker')
                   if worker_rss else ''))
        same = all(a == archives[0] for a in archives[1:])
        print(f'Archives identical (members, order, bytes): {"yes" if same else "NO"}; '
              f'load average after: {os.getloadavg()[0]:.2f}')
        if not same:
            sys.exit(1)


if __name__ == '__main__':
    main()
