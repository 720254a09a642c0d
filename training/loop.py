"""The EDM2 training loop: one call of `training_loop(opts)` trains or resumes the run in `opts.outdir`.

- data and noise: the images and noise of every optimiser step are functions of (seed, step) alone
  (`training.stream`), whatever the number of processes W and accumulation rounds.
- loss: `training.loss.EDM2Loss` (learned uncertainty weighting) summed over all elements, divided by the
  per-process batch B/W (DDP then averages over processes: the gradient is the mean over the B
  images), times --ls.
- optimiser: Adam (0.9, 0.99, eps 1e-8) with the learning-rate schedule of `learning_rate`.
  Non-finite gradient elements are zeroed and counted; a non-finite loss stops the run.
- EMA: `edm2.phema.PowerFunctionEMA` (EDM2 paper, Sec. 3.1) on rank 0, one copy per sigma_rel,
  updated after every step; snapshots `network-snapshot-{kimg:07d}-{std:.3f}` in the native format.
- checkpoints and resuming: `training.state`; settings and checks before any work: `training.options`.
- SIGINT / SIGTERM: the current step finishes, a checkpoint is written and the loop returns. Any
  error shuts the data workers down and raises `TrainingError` (one line; details in log.txt).
"""

import contextlib
import copy
import dataclasses
import os
import signal
import sys
import time
import traceback

import psutil
import torch
from tqdm import tqdm

from edm2 import distributed as dist
from edm2 import encoders, runtime
from edm2.checkpoint import save_network, snapshot_file_name
from edm2.errors import one_line
from edm2.fileio import NoSpaceError, open_append, reporting_full_disk
from edm2.networks import build_network
from edm2.run_lock import FolderInUseError, hold_run_folder
from edm2.phema import PowerFunctionEMA
from . import loss_buckets
from edm2 import jsontext
from . import state as run_state
from . import watching
from .loss import EDM2Loss
from .optimizer import adam, learning_rate
from .options import TrainingError, check_snapshot_names, format_nimg, prepare, settings
from .processes import StopFlag, ignore_stop_signals, peer_failed, shut_down_workers, worker_error_text
from .stream import InfiniteSampler, step_seed


class _Logger:
    """Status lines to the console (through tqdm when a bar is shown) and to log.txt, rank 0 only."""

    def __init__(self, path):
        self.path = path
        with reporting_full_disk(path):
            self.file = open_append(path) if dist.is_main() else None
        self.bar = None

    def __call__(self, msg, console=True):
        if not dist.is_main():
            return
        if console:
            (self.bar.write if self.bar is not None else lambda m: print(m, flush=True))(msg)
        if self.file is not None:
            try:
                with reporting_full_disk(self.path):
                    self.file.write(msg + '\n')
                    self.file.flush()
            except NoSpaceError:
                self.close()  # no further lines: the error itself is reported on the console
                raise

    def close(self):
        if self.file is not None:
            with contextlib.suppress(OSError):  # a full disk: what could not be flushed is lost
                self.file.close()
            self.file = None


def _format_time(seconds):
    s = int(seconds)
    if s < 60:
        return f'{s}s'
    if s < 3600:
        return f'{s // 60}m {s % 60:02d}s'
    return f'{s // 3600}h {(s // 60) % 60:02d}m'


# ----------------------------------------------------------------------------------------------

def training_loop(opts, dry_run=False, step_callback=None):
    """Train or resume the run described by `opts` (a `TrainingOptions`); returns a summary dict.

    Everything is checked before anything is written; errors are `EDM2Error`s with one-line messages.
    step_callback(cur_nimg), if given, is called after every optimiser step and EMA update (benchmarks).
    """
    device = dist.init(opts.device)
    prep = prepare(opts, dist.get_world_size())
    try:
        record = settings(opts, prep.net_kwargs)
        if dry_run:
            dist.print0(jsontext.dumps(dict(dataclasses.asdict(opts), batch_gpu=prep.batch_gpu,
                                        network_kwargs=prep.net_kwargs, parameters=prep.num_params,
                                        dataset_size=len(prep.dataset)), indent=2))
            return dict(dry_run=True, parameters=prep.num_params)
        # One run per folder; the lock also removes temporaries of a killed run (never renamed, so never used).
        try:
            with hold_run_folder(opts.outdir):
                return _train(opts, prep, record, device, step_callback)
        except FolderInUseError as e:
            raise TrainingError(str(e)) from None
    finally:
        prep.dataset.close()


def _train(opts, prep, record, device, step_callback):
    """The run itself, with the folder's lock held."""
    notes = []
    start = list(_agree_on_start(opts.outdir, record, notes.append))  # [checkpoint path, state] or Nones
    # --- From here on, output is written. ---------------------------------------------------
    session = _Session(opts, prep, record, device, _Logger(os.path.join(opts.outdir, 'log.txt')))
    for note in notes:
        session.log(note)
    result = session.run(start, step_callback)
    dist.barrier()  # every rank has finished writing before the lock is released
    return result


def _agree_on_start(outdir, record, log):
    """Rank 0 chooses the checkpoint (or a fresh start) and every rank loads the same file; an error
    found by rank 0 is raised on every rank."""
    choice, state = [None, None], None
    if dist.is_main():
        try:
            choice[0], state = run_state.choose_start(outdir, record, log)
        except TrainingError as e:
            choice[1] = str(e)
    if dist.get_world_size() > 1:
        torch.distributed.broadcast_object_list(choice, src=0)
        if not dist.is_main() and choice[0] is not None:
            state = run_state.load_state(choice[0])
    if choice[1] is not None:
        raise TrainingError(choice[1])
    return choice[0], state


class _Session:
    """One session of a run: the network, optimiser, EMA and data stream, and the step loop."""

    def __init__(self, opts, prep, record, device, log):
        self.opts, self.prep, self.record, self.device, self.log = opts, prep, record, device, log
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        torch.manual_seed(opts.seed)
        self.net = build_network(prep.net_kwargs)  # on the CPU from the seed: identical on every rank and device
        self.net.precision = opts.precision
        self.net.train().requires_grad_(True).to(device)
        self.optimizer = adam(self.net.parameters(), lr=opts.lr)
        self.ema = PowerFunctionEMA(self.net, stds=opts.ema_stds) if dist.is_main() else None
        self.loss_fn = EDM2Loss(P_mean=opts.P_mean, P_std=opts.P_std, sigma_data=self.net.sigma_data)
        # Latents need no VAE to train: the encoder only samples and scales them.
        self.encoder = encoders.StabilityVAEEncoder() if prep.dataset.is_latent else encoders.StandardRGBEncoder()
        self.cur_nimg, self.snapshot_nimgs = 0, []
        self.checked_nimg = 0  # image count at the last check of the loss
        # loss sum, element count, non-finite count, gradient-norm sum, steps, then the per-σ bucket sums
        self.stats = torch.cat([torch.zeros(5, dtype=torch.float64, device=device), loss_buckets.new_sums(device)])
        self.watch = None  # grids, metrics and loggers (training.watching), when asked for
        self.noise_gen = torch.Generator(device=device)
        self.stop = StopFlag()
        if device.type == 'cuda':
            torch.backends.cudnn.benchmark = bool(opts.bench)
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32; reduced precision is --precision
            torch.backends.cudnn.allow_tf32 = False

    def _resume(self, state_path, state):
        if state is None:
            if self.ema is not None:
                self.ema.reset()
            return
        self.cur_nimg, self.snapshot_nimgs = run_state.restore(state, self.net, self.optimizer, self.ema,
                                                               self.device)
        if self.cur_nimg % self.opts.batch:
            raise TrainingError(f'{state_path} is at {self.cur_nimg} images, not a multiple of --batch={self.opts.batch}')
        self.checked_nimg = self.cur_nimg
        self.log(f'Resuming from {state_path} at {self.cur_nimg} images ({self.cur_nimg // 1000} kimg)')
        if dist.is_main():
            run_state.truncate_stats(os.path.join(self.opts.outdir, 'stats.jsonl'), self.cur_nimg)

    def _loader(self):
        opts, workers = self.opts, self.opts.workers
        sampler = InfiniteSampler(len(self.prep.dataset), opts.batch, self.prep.batch_gpu, self.rank, self.world,
                                  opts.seed, self.cur_nimg // opts.batch)
        return torch.utils.data.DataLoader(
            self.prep.dataset, batch_size=self.prep.batch_gpu, sampler=sampler, num_workers=workers,
            pin_memory=self.device.type == 'cuda', worker_init_fn=ignore_stop_signals if workers else None,
            prefetch_factor=2 if workers else None, persistent_workers=False)

    def run(self, start, step_callback=None):
        """Resume from `start` = [checkpoint path, state] (emptied here, so that the state's memory is
        freed), then train until --duration or a stop signal; returns dict(cur_nimg, stopped)."""
        try:
            state_path, state = start
            start.clear()
            self._resume(state_path, state)
            del state
            check_snapshot_names(self.opts, self.cur_nimg, self.snapshot_nimgs)
            self._describe()
            if self.cur_nimg >= self.opts.duration:
                self.log(f'Nothing to do: the run in {self.opts.outdir} is already at {self.cur_nimg} images '
                         f'>= --duration {self.opts.duration}')
                return dict(cur_nimg=self.cur_nimg, stopped=False)
            if watching.wanted(self.opts):
                self.watch = watching.Watch(self.opts, dict(dataclasses.asdict(self.opts), **self.record),
                                            self.cur_nimg, self.net, self.encoder, self.device, self.log)
            with runtime.running(self.run_settings()):
                return self._steps(step_callback)
        except Exception as e:
            error = self._as_training_error(e)
            if error.report != 'none':
                with contextlib.suppress(NoSpaceError):  # the error is reported on the console regardless
                    self.log(f'Error: {error}', console=False)
            raise error from None
        finally:
            if self.watch is not None:
                self.watch.close()
            self.stop.restore()
            self.log.close()

    def run_settings(self):
        """How the U-Net runs (edm2.runtime): --precision on every device, or the published rule (--fp16:
        CUDA only); --compile. The loss, EMA, optimiser state and σ-conditioning stay float32."""
        precision = self.opts.precision if self.opts.precision_scope == 'all' else None
        return runtime.RunSettings(precision=precision, compile=self.opts.compile)

    def _as_training_error(self, error):
        """A one-line TrainingError for any failure; the traceback of unexpected ones goes to log.txt."""
        if isinstance(error, TrainingError):
            return error
        if isinstance(error, NoSpaceError):  # names the file; the last checkpoint resumes the run
            return TrainingError(f'training stopped at {self.cur_nimg} images: {error}', report='self')
        if self.world > 1 and peer_failed(error):
            return TrainingError('stopped: another process failed', report='none')  # that one reports
        where, details = (f' (rank {self.rank})' if self.world > 1 else ''), ''
        if dist.is_main() and self.log.file is not None:
            with contextlib.suppress(NoSpaceError):
                self.log(''.join(traceback.format_exception(error)), console=False)
            details = f' (traceback in {os.path.join(self.opts.outdir, "log.txt")})'
        return TrainingError(f'training stopped at {self.cur_nimg} images{where}: {type(error).__name__}: '
                             f'{one_line(error)}{details}', report='self')

    def _describe(self):
        opts, prep, ds = self.opts, self.prep, self.prep.dataset
        kind = f'conditional, {ds.label_dim} classes' if opts.cond else 'unconditional'
        self.log(f'Training {prep.num_params / 1e6:.2f}M parameters on {len(ds)} images {ds.image_shape} ({kind}); '
                 f'{self.world} process(es) on {self.device.type}, batch {opts.batch} = {self.world} x '
                 f'{prep.batch_gpu} x {prep.rounds} round(s), precision {self._precision_shown()}'
                 f'{", compiled" if opts.compile else ""}; duration '
                 f'{format_nimg(opts.duration)} images')
        self.log('(loss: the EDM2 loss weighted by the learned uncertainty u(sigma), error / e^u + u, which goes below '
                 'zero once u has learned that the error is small: lower is better, the sign means nothing)')

    def _precision_shown(self):
        """The arithmetic that really runs: an explicit --precision on every device; the preset's (or --fp16's)
        precision on CUDA, float32 elsewhere (the release's rule)."""
        opts = self.opts
        if self.device.type == 'cuda' or opts.precision == 'fp32' or opts.precision_scope == 'all':
            return opts.precision
        return f'fp32 ({opts.precision} applies on CUDA only; --precision {opts.precision} runs it here)'

    def _steps(self, step_callback):
        opts = self.opts
        ddp = self.net
        if self.world > 1:
            ddp = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device] if self.device.type == 'cuda' else None)
        tick = (self.cur_nimg, time.time(), time.time())  # status interval start: images, time; session start
        interactive = dist.is_main() and sys.stderr.isatty()  # log.txt and pipes get the status lines only
        bar = tqdm(total=opts.duration, initial=self.cur_nimg, unit='img', unit_scale=True, desc='train',
                   dynamic_ncols=True, mininterval=1.0) if interactive else None
        self.log.bar = bar
        self.stop.install()
        if self.watch is not None:
            self.watch.at_start(self.cur_nimg, self.ema)
            tick = (tick[0], time.time(), tick[2])
        data_iter = iter(self._loader())
        first, stopped = True, False
        try:
            while True:
                started = time.perf_counter()
                lr = self._step(ddp, data_iter)
                if first and self.opts.compile:
                    self.log(f'torch.compile: the first step took {time.perf_counter() - started:.1f} s '
                             f'(compilation of forward and backward included)')
                prev_nimg = self.cur_nimg - opts.batch
                if bar is not None:
                    bar.update(opts.batch)
                if step_callback is not None:
                    step_callback(self.cur_nimg)
                stopped = self._agree_on_stop()
                done = self.cur_nimg >= opts.duration
                tick = self._after_step(prev_nimg, lr, first, done, stopped, tick)
                first = False
                if stopped or done:
                    break
        finally:
            shut_down_workers(data_iter)
            if bar is not None:
                bar.close()
                self.log.bar = None
        if stopped:
            name = signal.Signals(self.stop.signum).name if self.stop.signum else 'a signal on another rank'
            self.log(f'Stopped by {name} at {self.cur_nimg} images; the checkpoint resumes the run')
        else:
            self.log(f'Done: {self.cur_nimg} images in {_format_time(time.time() - tick[2])}')
        return dict(cur_nimg=self.cur_nimg, stopped=stopped)

    def _next_batch(self, data_iter):
        try:
            return next(data_iter)
        except Exception as e:  # a worker could not read an image: its message, on the rank that met it
            raise TrainingError(f'--data: {worker_error_text(e)}', report='self') from None

    def _step(self, ddp, data_iter):
        """One optimiser step over --batch images (accumulation rounds included); returns its learning rate."""
        opts, batch, world, rank, bgpu = self.opts, self.opts.batch, self.world, self.rank, self.prep.batch_gpu
        step = self.cur_nimg // batch
        # Noise for all B rows of this step, from (seed, step): independent of W and batch_gpu.
        self.noise_gen.manual_seed(step_seed(opts.seed, step, 0))
        rnd_normal = torch.randn([batch, 1, 1, 1], device=self.device, generator=self.noise_gen)
        shape = (self.net.img_channels, self.net.img_resolution, self.net.img_resolution)
        eps = torch.randn([batch, *shape], device=self.device, generator=self.noise_gen)
        torch.manual_seed(step_seed(opts.seed, step, 1 + rank))  # dropout / latent sampling stream
        lr = learning_rate(self.cur_nimg, batch, opts.lr, opts.decay, opts.rampup)
        for g in self.optimizer.param_groups:
            g['lr'] = lr
        for a in range(self.prep.rounds):
            images, labels = self._next_batch(data_iter)
            images = self.encoder.encode(images.to(self.device, non_blocking=True)).to(torch.float32)
            labels = labels.to(self.device, non_blocking=True) if opts.cond else None
            rows = slice((a * world + rank) * bgpu, (a * world + rank + 1) * bgpu)
            last = ddp is self.net or a == self.prep.rounds - 1
            with contextlib.nullcontext() if last else ddp.no_sync():
                loss = self.loss_fn(ddp, images, labels, rnd_normal=rnd_normal[rows], eps=eps[rows])
                loss.sum().mul(opts.ls / (batch // world)).backward()
            image_losses = loss.detach().flatten(1).mean(1).to(torch.float64)
            self.stats[0] += image_losses.sum() * loss[0].numel()
            self.stats[1] += loss.numel()
            log_sigma = self.loss_fn.P_mean + self.loss_fn.P_std * rnd_normal[rows]
            loss_buckets.add(self.stats[5:], image_losses, log_sigma)
        self._apply_gradients()
        self.cur_nimg += batch
        if self.ema is not None:
            self.ema.update(cur_nimg=self.cur_nimg, batch_size=batch)
        return lr

    def _apply_gradients(self):
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        if self.opts.ls != 1:
            torch._foreach_mul_(grads, 1 / self.opts.ls)
        # Non-finite gradient elements are replaced by zero and counted; the fast check is one fused norm.
        norms = torch.stack(torch._foreach_norm(grads))
        if not bool(norms.isfinite().all()):
            for g in grads:
                self.stats[2] += (~g.isfinite()).sum()
                torch.nan_to_num_(g, nan=0, posinf=0, neginf=0)
            norms = torch.stack(torch._foreach_norm(grads))
        self.stats[3] += norms.double().square().sum().sqrt()  # the norm of the whole gradient, as applied
        self.stats[4] += 1
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _agree_on_stop(self):
        """Whether to stop after this step: a signal may reach only some ranks."""
        want = self.stop.signum is not None
        if self.world > 1:
            flag = torch.tensor([float(want)], device=self.device)
            dist.all_reduce_sum(flag)
            want = bool(flag.item() > 0)
        return want

    def _after_step(self, prev_nimg, lr, first, done, stopped, tick):
        """Status line, snapshots and checkpoint where an interval was crossed (and at the end); returns
        the new status-interval start. The first step and every output are preceded by the loss check."""
        opts, cur = self.opts, self.cur_nimg

        def crossed(interval):
            return interval > 0 and cur // interval > prev_nimg // interval

        status, snapshot, checkpoint = crossed(opts.status), crossed(opts.snapshot), crossed(opts.checkpoint)
        final = done or stopped
        watch = self.watch is not None and self.watch.due(prev_nimg, cur)
        if not (first or final or status or snapshot or checkpoint or watch):
            return tick
        self._check_loss_finite()
        if first and dist.is_main():  # settings are recorded once they have produced a successful step
            run_state.record_settings(opts.outdir, self.record)
        if status or final:
            tick = self._report(lr, tick)
        if snapshot or done:
            self._save_snapshots()
        if watch:  # before the checkpoint: a kill during it repeats it after resuming
            tick = (tick[0], tick[1] + self.watch.after_step(prev_nimg, cur, self.ema), tick[2])
        if checkpoint or final:
            if dist.is_main():
                run_state.save_state(opts.outdir, cur, self.net, self.optimizer, self.ema, self.record,
                                     self.snapshot_nimgs, self.device)
            dist.barrier()
        return tick

    def _check_loss_finite(self):
        """Stop when any loss since the last check was NaN or infinite (one synchronisation per output,
        none per step): what the network learnt since then is not worth a snapshot."""
        bad = (~self.stats[0].isfinite()).to(torch.float64).reshape(1)
        dist.all_reduce_sum(bad)
        if bad.item() > 0:
            raise TrainingError(f'the loss became non-finite between {self.checked_nimg} and {self.cur_nimg} images; '
                                f'stopped without writing snapshots or a checkpoint of this state (check --data for '
                                f'non-finite values, or lower --lr)')
        self.checked_nimg = self.cur_nimg

    def _report(self, lr, tick):
        """Log a status line and append it to stats.jsonl (statistics summed over ranks since the last one)."""
        dist.all_reduce_sum(self.stats)
        now, cur, device = time.time(), self.cur_nimg, self.device
        loss = float(self.stats[0] / max(float(self.stats[1]), 1))
        sec_per_kimg = (now - tick[1]) / max((cur - tick[0]) / 1000, 1e-9)
        gpu_mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else 0.0
        rec = dict(kimg=cur / 1000, nimg=cur, time=now - tick[2], sec_per_kimg=sec_per_kimg, loss=loss, lr=lr,
                   nonfinite=int(self.stats[2]), cpu_mem_gb=psutil.Process().memory_info().rss / 2 ** 30,
                   gpu_mem_gb=gpu_mem, grad_norm=float(self.stats[3] / max(float(self.stats[4]), 1)),
                   images_per_s=1000 / max(sec_per_kimg, 1e-9), **loss_buckets.record(self.stats[5:]))
        self.log(f'kimg {rec["kimg"]:<9.3f} time {_format_time(rec["time"]):<8s} sec/kimg {sec_per_kimg:<8.3f} '
                 f'loss {loss:<8.4f} lr {lr:<9.3g} nonfinite {rec["nonfinite"]:<4d} '
                 f'cpumem {rec["cpu_mem_gb"]:<6.2f} gpumem {gpu_mem:.2f}')
        if dist.is_main():
            path = os.path.join(self.opts.outdir, 'stats.jsonl')
            with reporting_full_disk(path), open_append(path) as f:
                f.write(jsontext.dumps(rec) + '\n')  # a line cut short is dropped on resume
            if self.watch is not None:
                self.watch.status(rec)
        self.stats.zero_()
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        return cur, time.time(), tick[2]

    def _save_snapshots(self):
        """One native snapshot per EMA length (parameters stored in --snapshot-dtype, buffers as they are)."""
        opts, cur = self.opts, self.cur_nimg
        self.snapshot_nimgs.append(cur)
        if not dist.is_main():
            return
        for ema_net, std in self.ema.get():
            net = copy.deepcopy(ema_net).cpu().eval().requires_grad_(False)
            if opts.snapshot_dtype == 'fp16':
                for p in net.parameters():
                    p.data = p.data.to(torch.float16)
            path = os.path.join(opts.outdir, snapshot_file_name('network-snapshot', cur // 1000, std))
            save_network(path, net, self.encoder, kimg=cur // 1000, ema_std=std, nimg=cur, batch=opts.batch,
                         dataset=opts.data, loss=dict(P_mean=opts.P_mean, P_std=opts.P_std,
                                                      sigma_data=ema_net.sigma_data))
