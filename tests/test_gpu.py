"""The GPU tier (``pytest -m gpu``): bf16 training on CUDA as a researcher runs it.

Every registered method takes one bf16 step at 224 px; the student's forward runs under bf16 autocast (from the flag
and from the launcher); compiled student and teacher give the eager losses; the teacher cache records and replays;
a run resumed from a mid checkpoint ends with the uninterrupted run's weights; ``--eval-student`` reproduces the run's
final evaluation; and a 20-step run makes no device-to-host read outside its logging steps.

On CUDA the models are DeiT-S (``deit_small_distilled_patch16_224``) ← RegNetY-160 at 224 px, random weights (no
downloads). Without CUDA every test is skipped, so CI (CPU) collects the tier and passes over it. Setting
``VITKD_GPU_TIER_DEVICE=cpu`` runs the same tests on the CPU at tiny sizes (32 px, patch 8, 2 blocks, a regnety_002
teacher, bf16 CPU autocast): a rehearsal of the tier itself on a machine without a GPU.
"""
import contextlib
import copy
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import vitkd
import vitkd.cli
from vitkd.distiller import Distiller, LossEntry
from vitkd.losses import Batch, RunInfo, create_loss, list_losses
from vitkd.models import set_fused_attention

ON_CPU = os.environ.get('VITKD_GPU_TIER_DEVICE', '').lower() == 'cpu'
DEVICE = 'cpu' if ON_CPU else 'cuda'
if not ON_CPU and torch.cuda.is_available():
    # cuBLAS reads this when it first starts: deterministic GEMMs for the exact-resume comparison
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (ON_CPU or torch.cuda.is_available()),
                                 reason='needs CUDA (VITKD_GPU_TIER_DEVICE=cpu rehearses the tier on the CPU)')]

STUDENT = 'deit_small_distilled_patch16_224'
if ON_CPU:
    IMG, TEACHER, WORKERS = 32, 'regnety_002', 0
    STUDENT_KWARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)
else:
    IMG, TEACHER, WORKERS = 224, 'regnety_160', 4
    STUDENT_KWARGS = {}
BATCH = 8
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 20, 2
STEPS_PER_EPOCH = CLASSES * TRAIN_PER_CLASS // BATCH  # 20
REF_STEPS, REF_SAVE_EVERY = 6, 3
# the epoch at which each method trains the student (FT pre-trains its paraphraser alone for its first 30 epochs)
METHOD_EPOCH = {'ft': 31.5}


# ---- shared fixtures and helpers -----------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state that refuses a second precision: every test starts from none."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def make_image_folder(root: Path) -> Path:
    """A synthetic RGB ImageFolder at the tier's image size: each class its own colour plus noise."""
    rng = np.random.default_rng(0)
    for split, n in (('train', TRAIN_PER_CLASS), ('val', VAL_PER_CLASS)):
        for c in range(CLASSES):
            folder = root / split / f'class{c}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((IMG, IMG, 3), np.uint8)
                base[..., c % 3] = 25 * (c + 1)
                img = np.clip(base + rng.integers(0, 80, (IMG, IMG, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f'{i}.png')
    return root


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('data'))


def cli_args(data: Path, out: Path, *extra: str, precision: bool = True) -> list[str]:
    """DeiT-S ← RegNetY-160 (tiny stand-ins on the CPU), VkD, full DeiT augmentation, bf16 unless ``precision`` is
    False (the launcher then decides)."""
    args = ['--data-path', str(data), '--input-size', str(IMG), '--student', STUDENT, '--teacher', TEACHER,
            '--no-teacher-pretrained', '--no-eval-teacher', '--distill', 'vkd', '--epochs', '1',
            '--batch-size', str(BATCH), '--num-workers', str(WORKERS), '--lr', '1e-4', '--unscale-lr',
            '--warmup-epochs', '0', '--cpu-malloc', 'system', '--output-dir', str(out)]
    if precision:
        args += ['--mixed-precision', 'bf16']
    if STUDENT_KWARGS:
        args += ['--student-kwargs', *(f'{k}={v}' for k, v in STUDENT_KWARGS.items())]
    return args + list(extra)


def run_cli(args: list[str], deterministic: bool = False) -> int:
    """``main.main`` in this process (hooks and counters see the run).

    ``deterministic``: deterministic kernels, so that two runs can be compared bit for bit (the resume test). On CUDA
    that also means the math attention kernel: FlashAttention's and the memory-efficient kernel's backward accumulate
    with atomics, which ``use_deterministic_algorithms(warn_only=True)`` only warns about.
    """
    import main
    previous = torch.are_deterministic_algorithms_enabled()
    with contextlib.ExitStack() as stack:
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            stack.callback(torch.use_deterministic_algorithms, previous)
            if not ON_CPU:
                from torch.nn.attention import SDPBackend, sdpa_kernel
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        code = main.main(args)
    assert code == 0, f'main.main exited {code}'
    return code


def step_records(out: Path) -> list[dict]:
    lines = (out / 'log.jsonl').read_text().splitlines()
    return [r for r in map(json.loads, lines) if r['kind'] == 'step']


def is_student_block(module: torch.nn.Module) -> bool:
    from timm.models.vision_transformer import Block
    return isinstance(module, Block) and module.training  # the teacher is a CNN; evaluation runs in eval mode


class AutocastRecorder:
    """Global module hooks: inside each training-mode student block, the autocast state and the MLP's output dtype."""

    def __init__(self):
        self.states: list[tuple[bool, torch.dtype]] = []
        self.mlp_dtypes: list[torch.dtype] = []
        self._inside = 0

    def _pre(self, module, args):
        if is_student_block(module):
            self._inside += 1
            self.states.append((torch.is_autocast_enabled(DEVICE), torch.get_autocast_dtype(DEVICE)))

    def _post(self, module, args, output):
        from timm.layers import Mlp
        if is_student_block(module):
            self._inside -= 1
        elif isinstance(module, Mlp) and self._inside:
            self.mlp_dtypes.append(output.dtype)

    @contextlib.contextmanager
    def active(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        handles = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


@pytest.fixture(scope='module')
def reference(data, tmp_path_factory) -> dict:
    """The uninterrupted bf16 run the other tests compare against: 6 steps, a checkpoint every 3, every step logged,
    deterministic kernels, the autocast state inside the student recorded."""
    out = tmp_path_factory.mktemp('reference') / 'run'
    recorder = AutocastRecorder()
    with recorder.active():
        run_cli(cli_args(data, out, '--max-steps', str(REF_STEPS), '--save-every-steps', str(REF_SAVE_EVERY),
                         '--keep-last', '10', '--log-every', '1'), deterministic=True)
    return dict(out=out, recorder=recorder)


def max_abs_diff(a: Path, b: Path) -> float:
    """Largest elementwise difference between two safetensors files (same tensor names required)."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return max((x.double() - tb[k].double()).abs().max().item() for k, x in ta.items())


# ---- 1. every method, one bf16 step --------------------------------------------------------------------------------

NUM_CLASSES = 10


@pytest.fixture(scope='module')
def teacher_on_host():
    torch.manual_seed(1)
    return vitkd.create_teacher(TEACHER, NUM_CLASSES, pretrained=False)


@pytest.mark.parametrize('name', [name for name, _ in list_losses()])
def test_every_method_takes_a_bf16_step_that_trains_the_student_and_never_the_teacher(name, teacher_on_host):
    loss = create_loss(name)
    torch.manual_seed(0)
    student = vitkd.create_student(STUDENT, NUM_CLASSES, **STUDENT_KWARGS)
    if loss.disable_fused_attn:  # second-order gradients through attention need timm's explicit path
        set_fused_attention(student, False)
    student.to(DEVICE)
    teacher = copy.deepcopy(teacher_on_host).to(DEVICE)
    info = RunInfo(num_classes=NUM_CLASSES, num_samples=64, epochs=40, steps_per_epoch=8, input_size=(3, IMG, IMG),
                   student_name=STUDENT, student_kwargs=STUDENT_KWARGS)
    distiller = Distiller(student, teacher, [LossEntry(loss)], info).to(DEVICE)
    if hasattr(loss, 'set_centers'):  # ND's class centres come from a data pass; any valid ones will do here
        width = distiller.teacher_features(torch.zeros(2, 3, IMG, IMG, device=DEVICE)).pooled.shape[-1]
        loss.set_centers(torch.randn(NUM_CLASSES, width, device=DEVICE))
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=1e-4)
    distiller.train()
    torch.manual_seed(2)
    images = torch.randn(BATCH, 3, IMG, IMG, device=DEVICE)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = distiller(Batch(images, F.one_hot(labels, NUM_CLASSES).float(), labels,
                                   index=torch.arange(BATCH, device=DEVICE), progress=METHOD_EPOCH.get(name, 1.5)))
    assert torch.isfinite(out['loss']), f'{name}: loss {out["loss"]}'
    assert all(torch.isfinite(v).all() for v in out['terms'].values()), out['terms']
    out['loss'].backward()

    assert all(p.grad is None for p in teacher.parameters())
    student_grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert student_grads and any(g.abs().sum() > 0 for g in student_grads)
    assert all(torch.isfinite(g).all() for g in student_grads)
    own = {n: p.grad for n, p in distiller.named_parameters() if n.startswith('losses.') and p.requires_grad}
    if own:
        assert any(g is not None and g.abs().sum() > 0 for g in own.values()), f'{name}: no gradient to its parts'
    optimizer.step()
    assert any(not torch.equal(p, student_before[n]) for n, p in student.named_parameters())
    after = teacher.state_dict()
    assert all(torch.equal(after[k], v) for k, v in teacher_before.items()), f'{name} changed the teacher'
    assert not teacher.training and not teacher.model.training


# ---- 2. autocast inside the student's forward ----------------------------------------------------------------------

def assert_bf16_inside_student(recorder: AutocastRecorder) -> None:
    assert recorder.states, 'no training-mode student block ran'
    assert set(recorder.states) == {(True, torch.bfloat16)}
    assert recorder.mlp_dtypes and set(recorder.mlp_dtypes) == {torch.bfloat16}


def test_the_student_forward_runs_under_bf16_autocast_with_the_flag(reference):
    assert_bf16_inside_student(reference['recorder'])
    assert yaml.safe_load((reference['out'] / 'config.yaml').read_text())['mixed_precision'] == 'bf16'


def test_the_student_forward_runs_under_bf16_autocast_from_the_launcher(data, tmp_path, monkeypatch):
    """``accelerate launch --mixed_precision bf16`` (or an accelerate config saying bf16) exports this variable; a run
    without ``--mixed-precision`` trains in that precision and records it."""
    monkeypatch.setenv('ACCELERATE_MIXED_PRECISION', 'bf16')
    out = tmp_path / 'run'
    recorder = AutocastRecorder()
    with recorder.active():
        run_cli(cli_args(data, out, '--max-steps', '2', precision=False))
    assert_bf16_inside_student(recorder)
    assert yaml.safe_load((out / 'config.yaml').read_text())['mixed_precision'] == 'bf16'


# ---- 3. compiled student and teacher -------------------------------------------------------------------------------

def test_compiled_student_and_teacher_give_the_eager_losses(data, reference, tmp_path):
    out = tmp_path / 'run'
    run_cli(cli_args(data, out, '--max-steps', str(REF_STEPS), '--save-every-steps', str(REF_SAVE_EVERY),
                     '--keep-last', '10', '--log-every', '1', '--compile-student', '--compile-teacher'))
    compiled, eager = step_records(out), step_records(reference['out'])
    assert [r['step'] for r in compiled] == [r['step'] for r in eager] == list(range(1, REF_STEPS + 1))
    for c, e in zip(compiled, eager):
        assert np.isfinite(c['loss'])
        # bf16 keeps 8 significant bits; fused kernels round differently, and the difference grows with the steps
        assert c['loss'] == pytest.approx(e['loss'], rel=3e-2), (c['step'], c['loss'], e['loss'])


# ---- 4. teacher cache: record, then replay -------------------------------------------------------------------------

def test_the_teacher_cache_records_one_epoch_and_replays_it_without_the_teacher(data, tmp_path, monkeypatch):
    """Two epochs over one cached data epoch at a learning rate too small to move the weights: epoch 1 replays epoch
    0's images, mixes and teacher outputs, so its losses are epoch 0's, and the teacher never runs in it."""
    import main
    calls, per_epoch = [], []
    live = Distiller.teacher_features
    monkeypatch.setattr(Distiller, 'teacher_features', lambda self, x: calls.append(1) or live(self, x))
    train_one_epoch = vitkd.cli.train_one_epoch

    def counted_epoch(*args, **kwargs):
        before = len(calls)
        result = train_one_epoch(*args, **kwargs)
        per_epoch.append(len(calls) - before)
        return result

    monkeypatch.setattr(vitkd.cli, 'train_one_epoch', counted_epoch)
    out = tmp_path / 'run'
    run_cli(cli_args(data, out, '--epochs', '2', '--teacher-cache', str(tmp_path / 'cache'),
                     '--teacher-cache-epochs', '1', '--log-every', '1', '--lr', '1e-12', '--min-lr', '1e-12',
                     '--warmup-lr', '1e-12', '--weight-decay', '0'))
    assert per_epoch == [STEPS_PER_EPOCH, 0]
    records = step_records(out)
    assert [r['step'] for r in records] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    recorded, replayed = records[:STEPS_PER_EPOCH], records[STEPS_PER_EPOCH:]
    terms = [k for k in recorded[0] if k == 'loss' or k.startswith('vkd.')]
    assert len(terms) >= 3
    for a, b in zip(recorded, replayed):
        for k in terms:
            assert b[k] == pytest.approx(a[k], rel=5e-3, abs=1e-5), (b['step'], k)
    # the steps of an epoch are different batches: matching them pairwise is not trivially true
    assert max(abs(a['loss'] - b['loss']) for a, b in zip(recorded, recorded[1:])) > 1e-3


# ---- 5. checkpoint and exact resume --------------------------------------------------------------------------------

def test_a_run_resumed_from_its_mid_checkpoint_ends_with_the_uninterrupted_weights(data, reference, tmp_path):
    ref = reference['out']
    mid = ref / 'checkpoints' / f'step_{REF_SAVE_EVERY:08d}'
    assert (mid / 'trainer_state.json').is_file()
    out = tmp_path / 'run'
    run_cli(cli_args(data, out, '--max-steps', str(REF_STEPS), '--save-every-steps', str(REF_SAVE_EVERY),
                     '--keep-last', '10', '--log-every', '1', '--resume', str(mid)), deterministic=True)
    assert [r['step'] for r in step_records(out)] == list(range(REF_SAVE_EVERY + 1, REF_STEPS + 1))
    final = f'checkpoints/step_{REF_STEPS:08d}/model.safetensors'  # the whole distiller, VkD's projector included
    for name in ('student/model.safetensors', final):
        diff = max_abs_diff(ref / name, out / name)
        assert diff <= 1e-6, f'{name}: resumed run differs from the uninterrupted one by up to {diff:.3g}'
    resumed = {r['step']: r['loss'] for r in step_records(out)}
    for r in step_records(ref)[REF_SAVE_EVERY:]:
        assert resumed[r['step']] == pytest.approx(r['loss'], rel=1e-6, abs=1e-7)


# ---- 6. --eval-student on the export -------------------------------------------------------------------------------

def test_eval_student_on_the_export_gives_the_runs_final_evaluation(data, reference, tmp_path):
    ref = reference['out']
    out = tmp_path / 'eval'
    run_cli(['--eval-student', '--student-ckpt', str(ref / 'student'), '--data-path', str(data),
             '--batch-size', str(BATCH), '--num-workers', str(WORKERS), '--mixed-precision', 'bf16',
             '--cpu-malloc', 'system', '--output-dir', str(out)], deterministic=True)
    evaluated = json.loads((out / 'eval_student.json').read_text())['metrics']
    trained = json.loads((ref / 'summary.json').read_text())['student']
    assert evaluated['samples'] == CLASSES * VAL_PER_CLASS
    for head in ('cls', 'dist', 'avg'):
        assert evaluated[f'{head}_top1'] == trained[f'{head}_top1'], head
        assert evaluated[f'{head}_top5'] == trained[f'{head}_top5'], head


# ---- 7. no host syncs outside logging steps ------------------------------------------------------------------------

class HostReads(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense``: what ``.item()``, ``float()``, ``int()`` and ``bool()`` of a tensor call,
    i.e. a device-to-host read that waits for the device.

    On CUDA only reads of CUDA tensors count (a host tensor's read waits for nothing). On the CPU every tensor is a
    host tensor, so all reads count except inside ``optimizer.step()``, whose step counters live on the host on
    CUDA too.
    """

    def __init__(self):
        super().__init__()
        self.count = 0
        self.in_optimizer = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            if args[0].device.type != 'cpu' or (ON_CPU and not self.in_optimizer):
                self.count += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def outside_optimizer_steps(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        def pre(*_):
            self.in_optimizer = True

        def post(*_):
            self.in_optimizer = False

        handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


@contextlib.contextmanager
def cuda_sync_warnings():
    """``torch.cuda.set_sync_debug_mode('warn')``: every synchronizing CUDA call warns; yields the warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode('default')


# Runs checked for host reads: VkD in bf16 (the default run), the methods that talk across the batch or the processes
# (CRD's memory banks, DIST's relations), fp16 with its gradient scaler (CUDA only), the EMA student, and ND (its
# class centres come from a teacher pass over the training set before the first step).
SYNC_RUNS = {'vkd': (), 'crd': ('--distill', 'crd'), 'dist': ('--distill', 'dist'),
             'fp16': ('--mixed-precision', 'fp16'), 'ema': ('--model-ema',), 'nd': ('--distill', 'nd')}
# CRD reads its normalising constants Z once, at the run's first step (they are fixed from then on: crd.py).
FIRST_STEP_READS = {'crd'}


@pytest.mark.parametrize('run', list(SYNC_RUNS))
def test_a_20_step_run_reads_from_the_device_only_on_logging_steps(run, data, tmp_path, monkeypatch):
    """Each training step's window runs from the distiller's forward to the next step's forward (backward, optimizer,
    schedule, logging, the next batch's copy to the device). Windows of steps that log.jsonl shows as logged may
    read; every other window must make no read at all."""
    if run == 'fp16' and ON_CPU:
        pytest.skip('fp16 needs CUDA (the CPU rehearsal refuses it with a usage error)')
    monkeypatch.setenv('VITKD_CACHE_DIR', str(tmp_path / 'cache'))  # ND's centre cache: this test's own
    host_reads = HostReads()
    marks: list[tuple[int, int]] = []  # (host reads, sync warnings) at the start of each step
    caught: list = []

    def step_started(module, args):
        if isinstance(module, Distiller) and module.training:
            marks.append((host_reads.count, len(caught)))

    from torch.nn.modules.module import register_module_forward_pre_hook
    out = tmp_path / 'run'
    handle = register_module_forward_pre_hook(step_started)
    try:
        with contextlib.ExitStack() as stack:
            if not ON_CPU:
                caught = stack.enter_context(cuda_sync_warnings())
            stack.enter_context(host_reads.outside_optimizer_steps())
            stack.enter_context(host_reads)
            # loader workers, as on a GPU: the augmentations' own host reads stay in the worker processes
            run_cli(cli_args(data, out, '--log-every', '10', '--num-workers', str(max(WORKERS, 1)), *SYNC_RUNS[run]))
    finally:
        handle.remove()
    marks.append((host_reads.count, len(caught)))
    logged = {r['step'] for r in step_records(out)}
    assert len(marks) - 1 == STEPS_PER_EPOCH and logged == {10, STEPS_PER_EPOCH}
    reads, warned = {}, {}
    for step in range(1, len(marks)):
        (reads_before, caught_before), (reads_after, caught_after) = marks[step - 1], marks[step]
        reads[step] = reads_after - reads_before
        warned[step] = sum('synchronizing CUDA operation' in str(w.message) for w in caught[caught_before:caught_after])
    allowed = logged | ({1} if run in FIRST_STEP_READS else set())
    stalls = {step: (reads[step], warned[step]) for step in reads
              if step not in allowed and (reads[step] or warned[step])}
    assert not stalls, f'device-to-host reads (dispatch count, CUDA sync warnings) in non-logging steps: {stalls}'
    assert all(reads[step] > 0 for step in logged)  # logging reads the terms: the counter sees reads


# ---- 8. ND's class centres: the teacher pass over the training set --------------------------------------------------

def test_nd_centres_are_the_teachers_class_means_on_the_device(data, tmp_path, monkeypatch):
    """The centres pass of an ND run (on the run's device, loader workers, the teacher in the run's precision) against
    the per-class means recomputed from the same loader and teacher by masks instead of ``index_add_``. Tolerance: the
    pass rounds each mean to 4 decimals (1e-4), and a rerun of the bf16 teacher may pick other cuDNN kernels (one bf16
    ulp, 2^-8 relative, of the largest embedding value)."""
    from vitkd import centers as centers_mod
    monkeypatch.setenv('VITKD_CACHE_DIR', str(tmp_path / 'cache'))
    seen = {}
    compute_or_load = centers_mod._compute_or_load

    def recorded(teacher, loader, *args, **kwargs):
        seen.update(teacher=teacher, loader=loader)
        return compute_or_load(teacher, loader, *args, **kwargs)

    monkeypatch.setattr(centers_mod, '_compute_or_load', recorded)
    out = tmp_path / 'run'
    run_cli(cli_args(data, out, '--distill', 'nd', '--max-steps', '2', '--log-every', '1'))
    files = sorted((tmp_path / 'cache' / 'centers').glob('centers-*.safetensors'))
    assert len(files) == 1, 'the centres pass wrote no centre file'
    centres = load_file(str(files[0]))['centers'].double()  # [K, D]
    assert all(np.isfinite(r['loss']) for r in step_records(out))

    model, prepare = centers_mod._unwrap(seen['teacher'])
    model.eval()
    device = next(model.parameters()).device
    sums, counts, largest = torch.zeros_like(centres), torch.zeros(CLASSES, dtype=torch.float64), 0.0
    with torch.no_grad():
        for images, labels, *_ in seen['loader']:
            emb = centers_mod.teacher_embeddings(model, prepare(images.to(device))).double().cpu().round(decimals=4)
            largest = max(largest, emb.abs().max().item())
            for c in range(CLASSES):
                mask = torch.as_tensor(labels) == c
                sums[c] += emb[mask].sum(0)
                counts[c] += mask.sum()
    assert (counts == TRAIN_PER_CLASS).all()
    expected = sums / counts[:, None]
    tolerance = 1e-4 + 2 ** -8 * largest
    assert (centres - expected).abs().max().item() <= tolerance
