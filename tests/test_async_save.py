"""Background checkpoint writes (vitkd/async_save.py, ``Checkpointer(background=True)``, what main.py uses): the same
files as a foreground save, from the state at the time of the save, and a failed write reported as a foreground one.
The kill-at-random-points tests (tests/test_kill_resume.py, tests/test_checkpoint.py) run main.py, hence this path."""
import json
from pathlib import Path

import pytest
import torch
from accelerate.utils import load
from safetensors.torch import load_file

from test_checkpoint import REPO, make_image_folder, train_args
from vitkd import checkpoint as checkpoint_mod
from vitkd.async_save import BackgroundWriter, host_copy, host_module
from vitkd.checkpoint import Checkpointer, find_checkpoints

torch.set_num_threads(1)


@pytest.fixture
def trained_run(tmp_path, monkeypatch):
    """A tiny run built in-process, after one optimizer step (so the optimizer has moments) and one EMA update."""
    monkeypatch.chdir(REPO)
    from vitkd.devices import make_accelerator
    from vitkd.run import build_run
    from vitkd.arguments import parse_args
    data = make_image_folder(tmp_path / 'data')
    cfg, _ = parse_args(train_args(data, tmp_path / 'run'))
    accelerator = make_accelerator(cfg)
    r = build_run(cfg, accelerator)
    torch.manual_seed(0)
    for p in r.distiller_unwrapped.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    r.optimizer.step()
    r.ema.update(r.student, step=1)
    r.state.step, r.state.batches_done = 3, 3
    return cfg, r, accelerator, tmp_path


def _tensors(path: Path) -> dict:
    return load_file(str(path)) if path.suffix == '.safetensors' else load(str(path), weights_only=True)


def _assert_same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f'{where}[{i}]')
    elif hasattr(a, 'shape'):  # numpy RNG state
        assert (a == b).all(), where
    else:
        assert a == b, where


def test_background_save_writes_the_foreground_files_from_the_state_at_save_time(trained_run):
    cfg, r, accelerator, tmp = trained_run
    foreground = Checkpointer(cfg, r, tmp / 'fg', accelerator).save()
    background = Checkpointer(cfg, r, tmp / 'bg', accelerator, background=True)
    pending = background.save()
    with torch.no_grad():  # training goes on while the thread writes: none of this may reach the checkpoint
        for p in r.distiller_unwrapped.parameters():
            p.add_(1.0)
        for state in r.optimizer.state.values():
            state['exp_avg'].add_(1.0)
    torch.rand(3)  # the RNG moves on too
    assert background.wait() == pending == tmp / 'bg' / 'checkpoints' / 'step_00000003'
    names = sorted(str(p.relative_to(foreground)) for p in foreground.rglob('*') if p.is_file())
    assert names == sorted(str(p.relative_to(pending)) for p in pending.rglob('*') if p.is_file())
    assert {'model.safetensors', 'optimizer.bin', 'random_states_0.pkl', 'ema.safetensors',
            'student/model.safetensors', 'trainer_state.json'} <= set(names)
    for name in names:
        if name.endswith(('.safetensors', '.bin', '.pkl')):
            _assert_same(_tensors(foreground / name), _tensors(pending / name), name)
        elif name == 'trainer_state.json':
            a, b = (json.loads((d / name).read_text()) for d in (foreground, pending))
            assert {**a, 'saved_at': None} == {**b, 'saved_at': None}
        else:
            assert (foreground / name).read_bytes() == (pending / name).read_bytes(), name


def test_a_failed_background_write_is_reported_at_the_next_wait_and_keeps_the_last_checkpoint(trained_run,
                                                                                                 monkeypatch, capsys):
    cfg, r, accelerator, tmp = trained_run
    ckpt = Checkpointer(cfg, r, tmp / 'run', accelerator, background=True)
    first = ckpt.save()
    assert ckpt.wait() == first
    export = checkpoint_mod.export_model

    def disk_full(*args, **kwargs):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(checkpoint_mod, 'export_model', disk_full)
    r.state.step = 4
    ckpt.save()
    assert ckpt.wait() == first and ckpt.last_saved == first  # the failed save did not count
    out = capsys.readouterr().out
    assert 'could not save checkpoint step_00000004 (No space left on device)' in out and str(first) in out
    assert [s for s, _ in find_checkpoints(tmp / 'run')] == [3]
    assert not list((tmp / 'run' / 'checkpoints').glob('*.tmp'))  # the partial write was removed
    monkeypatch.setattr(checkpoint_mod, 'export_model', export)
    r.state.step = 5
    assert ckpt.save() and ckpt.wait() == tmp / 'run' / 'checkpoints' / 'step_00000005'  # the next save works


def test_writer_hands_back_what_the_write_raised_and_allows_one_write_at_a_time():
    writer = BackgroundWriter()
    writer.submit(lambda: 7)
    with pytest.raises(RuntimeError):
        writer.submit(lambda: 8)
    assert writer.wait() == (7, None) and writer.wait() == (None, None)
    writer.submit(lambda: 1 / 0)
    result, error = writer.wait()
    assert result is None and isinstance(error, ZeroDivisionError)


def test_host_copies_do_not_follow_the_originals():
    layer = torch.nn.Linear(3, 2)
    state = {'w': layer.weight, 'nested': [layer.bias, 4]}
    copied, module = host_copy(state), host_module(layer)
    with torch.no_grad():
        layer.weight.add_(1.0)
        layer.bias.add_(1.0)
    assert torch.equal(copied['w'] + 1, layer.weight) and torch.equal(copied['nested'][0] + 1, layer.bias)
    assert torch.equal(module.weight + 1, layer.weight) and isinstance(module.weight, torch.nn.Parameter)
    assert copied['nested'][1] == 4
