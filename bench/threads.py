"""Benchmark of the CPU thread policy: seconds per unit of work under each way of choosing threads, on the
machine as it is and with CPU hogs (`python -c "while True: pass"`) started beside it.

Each (policy, hog count) runs in a fresh child process, since OpenMP reads OMP_WAIT_POLICY and
OMP_NUM_THREADS once, when torch is imported. The workloads are the two that collapsed on a busy 2-core
machine: `toy` (training steps of the toy example's main model, as in `make demo` and tests/test_toy.py)
and `network` (forward passes of a small EDM2 U-Net, as in the generation and training tests).

    python bench/threads.py                      # every policy, 0 and 1 hog, both workloads
    python bench/threads.py --hogs 0,1,2 --workload toy --seconds 8

Policies: `default` (torch's own: one thread per core, OpenMP threads spin while waiting), `passive`
(the same threads, OMP_WAIT_POLICY=PASSIVE: waiting threads sleep), `one` (one thread), and `edm2`
(what edm2.threads.configure chooses, the policy every command and the test suite use). The table
prints seconds per unit and each policy's ratio to `one` measured in the same run.
"""

import json
import os
import subprocess
import sys
import time

import click

from machine import cpu_model  # bench/machine.py

POLICIES = {
    'default': {},
    'passive': {'OMP_WAIT_POLICY': 'PASSIVE'},
    'one': {'OMP_NUM_THREADS': '1'},
    'edm2': 'edm2',
}
HOG = 'while True: pass'


def _toy_unit():
    import torch

    from edm2.toy import gt, make_optimizer, train_step, ToyModel
    torch.manual_seed(0)
    net, ema = ToyModel(64, 4), ToyModel(64, 4)
    opt = make_optimizer(net)
    mixture = gt('A')
    sigma = torch.full((4096,), 0.1)
    x = mixture.sample(4096, sigma, generator=torch.Generator().manual_seed(0))
    target = mixture.score(x, sigma)
    return lambda: train_step(net, ema, opt, x, sigma, target, 0.01, 0.99)


def _network_unit():
    import torch

    from edm2.networks import build_network
    net = build_network(dict(img_resolution=16, img_channels=3, label_dim=0, model_channels=32,
                             channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])).eval()
    x, sigma = torch.randn(8, 3, 16, 16), torch.full((8,), 1.0)

    def unit():
        with torch.no_grad():
            net(x, sigma)
    return unit


def child(workload, policy, seconds):
    """Runs in the child: apply the policy, time units of work for `seconds`, print 'BENCH {json}'."""
    if policy == 'edm2':
        from edm2 import threads
        threads.configure()
    import torch
    unit = {'toy': _toy_unit, 'network': _network_unit}[workload]()
    unit()  # warm-up
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t0 = time.perf_counter()
        unit()
        times.append(time.perf_counter() - t0)
    times.sort()
    print('BENCH ' + json.dumps(dict(seconds=times[len(times) // 2], threads=torch.get_num_threads(),
                                     units=len(times))))


def measure(workload, policy, seconds):
    env = dict(os.environ)
    for key in ('OMP_NUM_THREADS', 'OMP_WAIT_POLICY', 'EDM2_THREADS'):
        env.pop(key, None)
    if isinstance(POLICIES[policy], dict):
        env.update(POLICIES[policy])
    run = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', workload, policy, str(seconds)],
                         capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.abspath(__file__)),
                         timeout=600)
    line = [x for x in run.stdout.splitlines() if x.startswith('BENCH ')]
    if run.returncode != 0 or not line:
        raise click.ClickException(f'{workload}/{policy} failed: {run.stderr.strip().splitlines()[-1:]}')
    return json.loads(line[0][6:])


@click.command(help=__doc__)
@click.option('--hogs', default='0,1', show_default=True, help='Numbers of CPU hogs to run beside, e.g. 0,1,2.')
@click.option('--workload', type=click.Choice(['toy', 'network', 'both']), default='both', show_default=True)
@click.option('--policies', default=','.join(POLICIES), show_default=True)
@click.option('--seconds', default=6.0, show_default=True, help='Time per policy (over all rounds).')
@click.option('--rounds', 'rounds_count', default=3, show_default=True,
              help='Policies are measured in turn this many times (the median round is printed): the load of a '
                   'shared machine changes between measurements.')
@click.option('--child', nargs=3, default=None, hidden=True)
def main(hogs, workload, policies, seconds, rounds_count, child=None):
    if child:
        return globals()['child'](child[0], child[1], float(child[2]))
    import psutil
    workloads = ['toy', 'network'] if workload == 'both' else [workload]
    names = policies.split(',')
    print(f'machine: {cpu_model()}, {os.cpu_count()} logical CPUs; load average before: '
          f'{", ".join(f"{v:.2f}" for v in psutil.getloadavg())}')
    for hog_count in [int(h) for h in hogs.split(',')]:
        procs = [subprocess.Popen([sys.executable, '-c', HOG]) for _ in range(hog_count)]
        try:
            time.sleep(1 if hog_count else 0)
            for w in workloads:
                rounds = [{p: measure(w, p, seconds / rounds_count) for p in names} for _ in range(rounds_count)]
                results = {p: dict(rounds[0][p], seconds=sorted(r[p]['seconds'] for r in rounds)[rounds_count // 2],
                                   units=sum(r[p]['units'] for r in rounds)) for p in names}
                base = results.get('one', {}).get('seconds')
                for p, r in results.items():
                    ratio = f'{r["seconds"] / base:5.2f}x one' if base else ''
                    print(f'hogs {hog_count}  {w:<8s} {p:<8s} threads {r["threads"]}  '
                          f'{r["seconds"] * 1e3:9.1f} ms/unit  {ratio}  ({r["units"]} units)')
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()


if __name__ == '__main__':
    main()
