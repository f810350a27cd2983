"""The progress display (bar on a terminal, plain lines otherwise, the run's ETA) and the numbers in the run's files."""
import io
import json
from types import SimpleNamespace

import pytest

from vitkd import progress as progress_mod
from vitkd.config import Config
from vitkd.progress import EpochProgress, rounded, warmup_warning

MAIN = SimpleNamespace(is_local_main_process=True)


class Terminal(io.StringIO):
    def isatty(self):
        return True


class Clock:
    """time.monotonic stand-in: each batch of the loop below takes exactly 2 s."""
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run_epoch(stream, epoch=0, epochs=3, batches=10, log_every=4, clock=None, **kwargs):
    bar = EpochProgress(list(range(batches)), MAIN, epoch, epochs, log_every, stream=stream, **kwargs)
    for i, _ in enumerate(bar):
        bar.set_postfix({'loss': 1.0 / (i + 1)})
        if clock is not None:
            clock.now += 2.0
    return bar


def test_plain_lines_every_log_every_steps_when_not_a_terminal():
    out = io.StringIO()
    run_epoch(out, batches=10, log_every=4)
    lines = out.getvalue().splitlines()
    assert '\r' not in out.getvalue()
    progress_lines = [l for l in lines if ' batch ' in l]
    assert [l.split(' batch ')[1].split()[0] for l in progress_lines] == ['4/10', '8/10', '10/10']
    assert all(l.startswith('epoch 1/3') for l in lines)
    assert lines[-1].startswith('epoch 1/3: 10 batches in')


def test_terminal_gets_a_bar_with_epoch_i_of_n_and_the_run_eta(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress_mod.time, 'monotonic', clock)
    out = Terminal()
    run_epoch(out, epoch=1, epochs=3, batches=10, clock=clock)
    text = out.getvalue()
    assert '\r' in text and 'epoch 2/3' in text and 'run ETA' in text
    assert text.rstrip().splitlines()[-1].startswith('epoch 2/3: 10 batches in 20s')


def test_run_eta_counts_the_later_epochs_and_max_steps(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress_mod.time, 'monotonic', clock)
    bar = EpochProgress(list(range(10)), MAIN, 0, 3, 100, stream=io.StringIO())
    it = iter(bar)
    for _ in range(5):  # 5 batches of 2 s
        next(it)
        clock.now += 2.0
    next(it)  # counts the 5th as done
    # 5 batches left in this epoch + 2 epochs of 10, 2 s each (the first batch's time is left out of the rate)
    assert bar.eta() == pytest.approx((5 + 20) * 2.0)
    capped = EpochProgress(list(range(10)), MAIN, 0, 3, 100, lambda: 5, max_steps=8, accum=2, stream=io.StringIO())
    capped.done = 5
    assert capped.remaining_batches() == (8 - 5) * 2


def test_only_the_local_main_process_shows_anything():
    out = Terminal()
    bar = EpochProgress(list(range(6)), SimpleNamespace(is_local_main_process=False), 0, 1, 1, stream=out)
    assert list(bar) == list(range(6))
    assert out.getvalue() == ''


def test_resume_mid_epoch_counts_from_the_first_batch_not_trained():
    out = io.StringIO()
    run_epoch(out, batches=6, log_every=2, first=4, num_batches=10)
    assert [l.split(' batch ')[1].split()[0] for l in out.getvalue().splitlines() if ' batch ' in l] == \
        ['6/10', '8/10', '10/10']


@pytest.mark.parametrize('tty', [False, True])
def test_a_run_stopped_mid_epoch_counts_the_batch_it_stopped_at(tty):
    """A loop that breaks after training its 3rd batch (max steps, time limit, signal) has done 3 batches."""
    out = Terminal() if tty else io.StringIO()
    bar = EpochProgress(list(range(10)), MAIN, 0, 1, 1, stream=out, first=2, num_batches=12)
    for i, _ in enumerate(bar):
        if i == 2:
            break
    bar.close()
    assert bar.done == 2 + 3
    assert out.getvalue().splitlines()[-1].startswith('epoch 1/1: 3 batches in ')


def test_rounding_follows_what_a_number_measures():
    record = rounded({'val_avg_top1': 71.234567, 'train_loss': 0.123456789, 'img_per_s': 1234.5678, 'samples': 60000,
                      'nested': {'teacher_top5': 99.87654}, 'lr': 0.000123456})
    assert record == {'val_avg_top1': 71.235, 'train_loss': 0.1235, 'img_per_s': 1234.6, 'samples': 60000,
                      'nested': {'teacher_top5': 99.877}, 'lr': 0.0001235}


@pytest.mark.parametrize('epochs, warmup, max_steps, per_epoch, warns', [
    (3, 5, None, None, True), (300, 5, None, None, False), (300, 5, 100, 50, True), (300, 1, 100, 50, False),
    (3, 0, None, None, False)])
def test_warmup_longer_than_the_run_is_warned(epochs, warmup, max_steps, per_epoch, warns):
    cfg = Config(epochs=epochs, warmup_epochs=warmup, max_steps=max_steps)
    assert (warmup_warning(cfg, per_epoch) is not None) == warns


def test_validation_metrics_go_to_the_step_of_the_epoch_end(tmp_path):
    from vitkd.reports import MetricLogger
    logged = []
    accelerator = SimpleNamespace(is_main_process=True, print=lambda *a: None, init_trackers=lambda *a, **k: None,
                                  log=lambda values, step: logged.append((step, values)))
    logger = MetricLogger(tmp_path, accelerator, Config(log_with=None, epochs=2, warmup_epochs=0))
    logger.trackers = True  # a tracker without its package: the logger's routing is what is tested
    for step in (50, 100, 117):
        logger.step({'step': step, 'loss': 1.0})
    logger.epoch(0, {'loss': 1.0}, {'avg_top1': 12.345678}, step=117)
    logger.finish()
    val = [(step, v) for step, v in logged if 'val/avg_top1' in v]
    assert val == [(117, {'val/avg_top1': 12.345678})]
    epoch_line = [json.loads(l) for l in (tmp_path / 'log.jsonl').read_text().splitlines()][-1]
    assert epoch_line['step'] == 117
    assert '12.346' in (tmp_path / 'epochs.csv').read_text()


def test_data_wait_share_counts_the_time_the_loop_waited_for_the_loader():
    """A loader that sleeps 3 s per batch (on a fake clock) before a step of 1 s: after the first batch (whose wait is
    the workers' start-up, left out), the loop waited 3 of every 4 seconds."""
    clock = Clock()

    def sleepy_loader(n, wait):
        for i in range(n):
            clock.now += wait
            yield i

    class Sized:
        def __init__(self, n, wait):
            self.n, self.wait = n, wait

        def __len__(self):
            return self.n

        def __iter__(self):
            return sleepy_loader(self.n, self.wait)

    out = io.StringIO()
    bar = EpochProgress(Sized(9, 3.0), MAIN, 0, 1, log_every=4, stream=out, clock=clock)
    for _ in bar:
        clock.now += 1.0  # the step
    assert bar.data_wait == pytest.approx(8 * 3.0)
    assert bar.data_wait_share() == pytest.approx(8 * 3.0 / (8 * (3.0 + 1.0)))  # from the first batch's end on
    lines = out.getvalue().splitlines()
    assert 'data-wait 75%' in lines[0] and '(75% waiting for data)' in lines[-1]
    fast = EpochProgress(Sized(9, 0.0), MAIN, 0, 1, log_every=4, stream=io.StringIO(), clock=clock)
    for _ in fast:
        clock.now += 1.0
    assert fast.data_wait_share() == 0.0
