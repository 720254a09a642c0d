"""What every benchmark shares (imported as `machine` by bench/*.py): the machine details printed next to
its numbers, a peak-memory sampler, and running a measurement in a fresh child process."""

import json
import os
import platform
import subprocess
import sys
import threading
import time


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform reports."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


class PeakRSS:
    """Context manager that samples this process's resident memory every 5 ms on a thread: `baseline` is
    the RSS on entry, `peak` the largest sample seen until exit (bytes)."""

    def __init__(self):
        import psutil
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.baseline = self.peak = 0

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self):
        self.baseline = self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def run_child(script, child_args, cwd) -> dict:
    """Run `script --child-args JSON` in a fresh Python process and return the JSON object it printed on
    its line starting with 'BENCH ' (a fresh process gives a clean memory baseline)."""
    import click

    from edm2.errors import one_line
    run = subprocess.run([sys.executable, os.path.abspath(script), '--child-args', json.dumps(child_args)],
                         capture_output=True, text=True, cwd=cwd)
    line = [x for x in run.stdout.splitlines() if x.startswith('BENCH ')]
    if run.returncode != 0 or not line:
        raise click.ClickException(f'child failed: {one_line(run.stderr)}')
    return json.loads(line[0][len('BENCH '):])
