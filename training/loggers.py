"""Experiment trackers of a training run: TensorBoard and Weights & Biases (`--logger`), on rank 0 only, with
the training time in thousands of images (kimg) as the step.

What is logged: the scalars of every stats.jsonl line (loss, per-σ loss, learning rate, speed, memory), every
metrics.jsonl value, the sample grids as images, and the resolved options as the run's configuration. A
resumed run continues the same steps: TensorBoard event files are cut back to the checkpoint's kimg before
the new session writes (each file replaced atomically; a fresh start removes those of an earlier start),
W&B resumes the same run id (wandb-run-id.txt; a fresh start makes a new one), and a tag is logged only at
steps after the last one it has, so no step is logged twice or goes back. A logger that cannot start stops
the run before its first step (one line); one that fails later is switched off with one warning and
training goes on.
"""

import contextlib
import os
import secrets

from edm2 import jsontext
from edm2.errors import one_line
from edm2.fileio import atomic_write, atomic_write_text

from .options import TrainingError

WANDB_ID_FILE = 'wandb-run-id.txt'


def is_event_file(name):
    return 'tfevents' in name and not name.startswith('.')


def cut_event_files(folder, last_step):
    """Drop the events after `last_step` from the TensorBoard event files in `folder` (read and written
    with TensorBoard's own record reader and writer, the kept records byte for byte); a file left with no
    event is removed."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not is_event_file(name) or not os.path.isfile(path):
            continue
        records = list(RawEventFileLoader(path).Load())
        kept = [r for r in records if Event.FromString(r).step <= last_step]
        if not kept:
            os.unlink(path)
        elif len(kept) < len(records):
            with atomic_write(path) as f:
                writer = RecordWriter(f)
                for record in kept:
                    writer.write(record)


class TensorBoard:
    """Event files in the run folder itself (`tensorboard --logdir runs/` shows every run by its folder)."""
    name = 'tensorboard'

    def __init__(self, outdir, config, resume_kimg, opts):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrainingError('--logger tensorboard needs the tensorboard package: pip install "edm2[tensorboard]"'
                                ) from None
        cut_event_files(outdir, -1 if resume_kimg is None else resume_kimg)  # a fresh start keeps none
        self.writer = SummaryWriter(log_dir=outdir)
        if resume_kimg is None:
            self.writer.add_text('options', '```\n' + jsontext.dumps(config, indent=2) + '\n```', 0)

    def scalars(self, values, step):
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # what is logged before a checkpoint survives a kill

    def image(self, tag, array, step):
        self.writer.add_image(tag, array, step, dataformats='HWC' if array.ndim == 3 else 'HW')
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandB:
    """A W&B run (online, or offline as `WANDB_MODE` says) whose id is kept in the run folder."""
    name = 'wandb'

    def __init__(self, outdir, config, resume_kimg, opts):
        try:
            import wandb
        except ImportError:
            raise TrainingError('--logger wandb needs the wandb package: pip install "edm2[wandb]"') from None
        self.wandb = wandb
        id_path = os.path.join(outdir, WANDB_ID_FILE)
        if resume_kimg is not None and os.path.isfile(id_path):
            with open(id_path, encoding='utf-8') as f:
                run_id = f.read().strip()
        else:
            run_id = secrets.token_hex(4)
            atomic_write_text(id_path, run_id + '\n')
        self.run = wandb.init(project=opts.wandb_project or 'edm2', name=opts.wandb_name or os.path.basename(
            os.path.abspath(outdir)), group=opts.wandb_group, config=config, dir=outdir, id=run_id, resume='allow')

    def scalars(self, values, step):
        self.run.log(dict(values), step=step)

    def image(self, tag, array, step):
        self.run.log({tag: self.wandb.Image(array)}, step=step)

    def close(self):
        self.run.finish()


KINDS = {'tensorboard': TensorBoard, 'wandb': WandB}


class Loggers:
    """The --logger trackers of this session; image counts in, kimg steps out, each tag strictly increasing."""

    def __init__(self, opts, config, resume_nimg, log):
        self.log, self.trackers = log, []
        resume_kimg = None if not resume_nimg else resume_nimg // 1000
        self.floor = -1 if resume_kimg is None else resume_kimg  # steps up to here were logged before
        self.last = {}
        try:
            for name in opts.logger:
                try:
                    self.trackers.append(KINDS[name](opts.outdir, config, resume_kimg, opts))
                except TrainingError:
                    raise
                except Exception as e:
                    raise TrainingError(f'--logger {name}: could not start: {type(e).__name__}: {one_line(e)}'
                                        ) from None
        except BaseException:
            self.close()
            raise

    def _new(self, tag, step):
        if step <= self.last.get(tag, self.floor):
            return False
        self.last[tag] = step
        return True

    def _each(self, call):
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as e:
                self.trackers.remove(tracker)
                self.log(f'Warning: --logger {tracker.name} failed and is off for the rest of this session: '
                         f'{type(e).__name__}: {one_line(e)}')
                with contextlib.suppress(Exception):
                    tracker.close()

    def scalars(self, values, nimg):
        step = nimg // 1000
        values = {tag: float(v) for tag, v in values.items() if v is not None and self._new(tag, step)}
        if values:
            self._each(lambda t: t.scalars(values, step))

    def image(self, tag, array, nimg):
        step = nimg // 1000
        if self._new(tag, step):
            self._each(lambda t: t.image(tag, array, step))

    def close(self):
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            with contextlib.suppress(Exception):
                tracker.close()
