"""CRD (``crd``): Eq. 18 against explicit loops, Z, bank updates and deduplication, negatives, checkpoints, and two
gloo processes holding identical banks. Expected values are recomputed here with loops / numpy.
"""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import math  # noqa: E402
import socket  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import vitkd  # noqa: E402,F401
from vitkd import distributed as vdist  # noqa: E402
from vitkd.distiller import Distiller, LossEntry  # noqa: E402
from vitkd.features import Features  # noqa: E402
from vitkd.losses import Batch, RunInfo, create_loss  # noqa: E402
from vitkd.losses.crd import (contrast_scores, crd_loss, group_by_class, last_occurrence,  # noqa: E402
                              momentum_update, nce_loss, sample_negatives)
from vitkd.models import create_student, create_teacher  # noqa: E402

D_S, D_T, FEAT, N_SAMPLES, N_CLASSES = 12, 20, 8, 40, 4


def np_normalize(x):
    return x / np.sqrt((x ** 2).sum(axis=-1, keepdims=True))


def loop_crd(v_s, v_t, mem_s, mem_t, contrast, z_s, z_t, tau, n):
    """Eq. 18 with explicit loops: student anchor vs the teacher bank, teacher anchor vs the student bank."""
    b_size, k_plus_1 = contrast.shape
    c = (k_plus_1 - 1) / n
    total = 0.0
    for anchor, bank, z in ((v_s, mem_t, z_s), (v_t, mem_s, z_t)):
        acc = 0.0
        for b in range(b_size):
            for k in range(k_plus_1):
                p = math.exp(float(np.dot(bank[contrast[b, k]], anchor[b])) / tau) / z
                acc += math.log(p / (p + c + 1e-7)) if k == 0 else math.log(c / (p + c + 1e-7))
        total += -acc / b_size
    return total


def make_crd(**opts):
    torch.manual_seed(0)
    loss = create_loss('crd', feat_dim=FEAT, **{'nce_k': 16, **opts})
    loss.setup(Features(pooled=torch.zeros(2, D_S)), Features(pooled=torch.zeros(2, D_T)),
               RunInfo(num_classes=N_CLASSES, num_samples=N_SAMPLES))
    return loss


def make_batch(index, labels=None, lam=1.0):
    labels = index % N_CLASSES if labels is None else labels
    return Batch(images=torch.zeros(len(index), 1, 1, 1), targets=torch.zeros(len(index), N_CLASSES), labels=labels,
                 labels_b=labels.flip(0), lam=lam, index=index)


def record_contrast(loss):
    seen = []
    original = loss.sample_contrast

    def wrapped(index, labels):
        out = original(index, labels)
        seen.append(out.clone())
        return out
    loss.sample_contrast = wrapped
    return seen


def test_crd_loss_matches_eq18_loop():
    g = torch.Generator().manual_seed(0)
    v_s = F.normalize(torch.randn(3, FEAT, generator=g), dim=1).double()
    v_t = F.normalize(torch.randn(3, FEAT, generator=g), dim=1).double()
    mem_s = F.normalize(torch.randn(N_SAMPLES, FEAT, generator=g), dim=1).double()
    mem_t = F.normalize(torch.randn(N_SAMPLES, FEAT, generator=g), dim=1).double()
    contrast = torch.randint(0, N_SAMPLES, (3, 6), generator=g)  # any J: the dataset-provided mode
    got = crd_loss(v_s, v_t, mem_s, mem_t, contrast, 3.0, 5.0, 0.07, N_SAMPLES).item()
    expected = loop_crd(v_s.numpy(), v_t.numpy(), mem_s.numpy(), mem_t.numpy(), contrast.numpy(), 3.0, 5.0, 0.07,
                        N_SAMPLES)
    assert got == pytest.approx(expected, rel=1e-9)
    swapped = crd_loss(v_s, v_t, mem_t, mem_s, contrast, 3.0, 5.0, 0.07, N_SAMPLES).item()
    assert swapped != pytest.approx(expected, rel=1e-6)  # anchors must read the *other* network's bank


def test_nce_loss_is_the_binary_noise_contrastive_log_loss():
    """Eq. 18 per row by hand (positive: log P/(P + K/N + ε); negatives: log (K/N)/(P + K/N + ε)), its gradient
    signs (raising the positive lowers the loss, raising a negative raises it) and its limits."""
    probs = torch.tensor([[5.0, 0.1, 0.2, 0.1], [0.3, 2.0, 0.05, 0.7]], dtype=torch.float64, requires_grad=True)
    n, eps = 100, 1e-7
    c = 3 / n
    by_hand = -sum(math.log(row[0] / (row[0] + c + eps)) + sum(math.log(c / (p + c + eps)) for p in row[1:])
                   for row in probs.tolist()) / 2
    loss = nce_loss(probs, n)
    assert loss.item() == pytest.approx(by_hand, rel=1e-12)
    loss.backward()
    assert (probs.grad[:, 0] < 0).all() and (probs.grad[:, 1:] > 0).all()
    # a confident positive and silent negatives cost nothing; the reverse costs without bound
    assert nce_loss(torch.tensor([[1e9, 0.0, 0.0, 0.0]], dtype=torch.float64), n).item() < 2e-5
    assert nce_loss(torch.tensor([[1e-9, 1e3, 1e3, 1e3]], dtype=torch.float64), n).item() > 30


def test_first_step_sets_z_scoring_uses_pre_update_banks_then_update():
    loss = make_crd()
    seen = record_contrast(loss)
    g = torch.Generator().manual_seed(1)
    f_s, f_t = torch.randn(4, D_S, generator=g), torch.randn(4, D_T, generator=g)
    index = torch.tensor([3, 7, 11, 20])
    old_s, old_t = loss.memory_s.clone(), loss.memory_t.clone()
    out = loss(Features(pooled=f_s), Features(pooled=f_t), make_batch(index))['crd'].item()
    with torch.no_grad():
        v_s = np_normalize((f_s @ loss.embed_s.weight.T + loss.embed_s.bias).double().numpy())
        v_t = np_normalize((f_t @ loss.embed_t.weight.T + loss.embed_t.bias).double().numpy())
    J = seen[0].numpy()
    assert (J[:, 0] == index.numpy()).all()
    ms, mt = old_s.double().numpy(), old_t.double().numpy()
    z_s = N_SAMPLES * np.mean([[math.exp(mt[J[b, k]] @ v_s[b] / 0.07) for k in range(J.shape[1])] for b in range(4)])
    z_t = N_SAMPLES * np.mean([[math.exp(ms[J[b, k]] @ v_t[b] / 0.07) for k in range(J.shape[1])] for b in range(4)])
    assert loss.z_s.item() == pytest.approx(z_s, rel=1e-5) and loss.z_t.item() == pytest.approx(z_t, rel=1e-5)
    assert out == pytest.approx(loop_crd(v_s, v_t, ms, mt, J, z_s, z_t, 0.07, N_SAMPLES), rel=1e-4)
    # update: batch rows = l2n(μ·old + (1−μ)·v), every other row bit-identical, unit norm
    rows = index.numpy()
    np.testing.assert_allclose(loss.memory_s[rows].double().numpy(), np_normalize(0.5 * ms[rows] + 0.5 * v_s),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss.memory_t[rows].double().numpy(), np_normalize(0.5 * mt[rows] + 0.5 * v_t),
                               rtol=1e-5, atol=1e-6)
    others = np.setdiff1d(np.arange(N_SAMPLES), rows)
    assert torch.equal(loss.memory_s[others], old_s[others]) and torch.equal(loss.memory_t[others], old_t[others])
    np.testing.assert_allclose(loss.memory_s[rows].norm(dim=1).numpy(), 1.0, rtol=1e-6)
    # Z is frozen after the first call
    loss(Features(pooled=f_s * 3), Features(pooled=f_t), make_batch(index + 1))
    assert loss.z_s.item() == pytest.approx(z_s, rel=1e-5) and loss.z_t.item() == pytest.approx(z_t, rel=1e-5)


def test_momentum_formula_and_duplicates_last_write_wins():
    g = torch.Generator().manual_seed(2)
    memory = F.normalize(torch.randn(10, 4, generator=g), dim=1).double()
    index = torch.tensor([3, 5, 3, 7, 5, 3])
    v = torch.randn(6, 4, generator=g).double()
    mu = 0.3
    expected = memory.clone().numpy()
    last = {}
    for pos, i in enumerate(index.tolist()):
        last[i] = pos
    for i, pos in last.items():
        expected[i] = np_normalize(mu * memory.numpy()[i] + (1 - mu) * v.numpy()[pos])
    out1, out2 = memory.clone(), memory.clone()
    momentum_update(out1, index, v, mu)
    momentum_update(out2, index, v, mu)
    np.testing.assert_allclose(out1.numpy(), expected, rtol=1e-12)
    assert torch.equal(out1, out2)


def test_a_bfloat16_bank_is_updated_in_fp32_and_read_at_the_anchors_precision():
    """Half the bank memory: the momentum update of a bf16 bank is the fp32 update of its values, rounded once; the
    scores read it at the anchor's fp32."""
    g = torch.Generator().manual_seed(12)
    bank = F.normalize(torch.randn(10, 4, generator=g), dim=1).bfloat16()
    index, v = torch.tensor([3, 5, 3]), torch.randn(3, 4, generator=g)
    expected = bank.float().clone()
    momentum_update(expected, index, v, 0.3)
    momentum_update(bank, index, v, 0.3)
    assert bank.dtype == torch.bfloat16 and torch.equal(bank, expected.bfloat16())
    anchor, contrast = F.normalize(torch.randn(2, 4, generator=g), dim=1), torch.tensor([[1, 3], [5, 0]])
    torch.testing.assert_close(contrast_scores(anchor, bank, contrast, 0.07),
                               contrast_scores(anchor, bank.float(), contrast, 0.07), rtol=0, atol=0)


def test_bank_dtype_option_stores_the_same_draw_in_half_the_memory():
    """``bank_dtype=bfloat16``: the initial banks are the fp32 run's draw rounded once, and a step's loss stays within
    what that rounding allows. bf16 rounds each entry to 2^-8 relative, so a score ⟨m, v⟩ (‖v‖ = 1) moves by
    δ ≤ 2^-8·‖m‖; log p = ⟨m, v⟩/τ − log Z moves by ≤ 2δ/τ (Z is a mean of such exponentials), each NCE log term
    by ≤ 2δ/τ (its slope in log p is ≤ 1), and the loss, a sum of the two networks' mean terms, by ≤ 4δ/τ."""
    full, half = make_crd(), make_crd(bank_dtype='bfloat16')
    assert half.memory_s.dtype == half.memory_t.dtype == torch.bfloat16 and full.memory_s.dtype == torch.float32
    assert torch.equal(half.memory_s, full.memory_s.bfloat16()) and torch.equal(half.memory_t, full.memory_t.bfloat16())
    assert half.memory_s.element_size() * 2 == full.memory_s.element_size()
    torch.manual_seed(3)
    v_s, v_t, index = torch.randn(4, D_S), torch.randn(4, D_T), torch.tensor([1, 5, 9, 13])
    delta = 2 ** -8 * max(full.memory_s.norm(dim=1).max().item(), full.memory_t.norm(dim=1).max().item())
    out = {}
    for name, loss in (('full', full), ('half', half)):
        torch.manual_seed(4)  # the same negatives
        out[name] = loss(Features(pooled=v_s), Features(pooled=v_t), make_batch(index))['crd']
    assert 0 < abs(out['half'].item() - out['full'].item()) <= 4 * delta / full.nce_t
    assert half.memory_s.dtype == torch.bfloat16  # the update kept the storage


def test_non_finite_embeddings_never_enter_the_bank():
    g = torch.Generator().manual_seed(4)
    memory = F.normalize(torch.randn(8, 4, generator=g), dim=1)
    index = torch.tensor([1, 2, 6])
    v = torch.randn(3, 4, generator=g)
    v[1, 2] = float('nan')
    out = memory.clone()
    momentum_update(out, index, v, 0.5)
    assert torch.equal(out[2], memory[2]) and torch.isfinite(out).all()
    np.testing.assert_allclose(out[6].numpy(), np_normalize(0.5 * memory[6].numpy() + 0.5 * v[2].numpy()), rtol=1e-5)
    untouched = [0, 3, 4, 5, 7]
    assert torch.equal(out[untouched], memory[untouched])


def test_negatives_never_anchor_class_nor_positive_and_uniform():
    g = torch.Generator().manual_seed(3)
    labels_table = torch.arange(30) % 3  # 3 classes, 10 samples each
    positive = torch.tensor([0, 4, 8])
    anchor_labels = labels_table[positive]
    draws = sample_negatives(positive, anchor_labels, labels_table, 6000, generator=g)
    assert (labels_table[draws] != anchor_labels[:, None]).all()
    assert (draws != positive[:, None]).all()
    for b in range(3):  # chi-square against uniform over the 20 other-class samples
        allowed = torch.nonzero(labels_table != anchor_labels[b]).flatten()
        counts = torch.bincount(draws[b], minlength=30)[allowed].double()
        expected = 6000 / len(allowed)
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 19 + 6 * math.sqrt(2 * 19)  # df 19: far beyond the 0.999 quantile (43.8) only if not uniform
        assert counts.sum() == 6000
    unknown = torch.full((30,), -1)  # classes not yet known: only the positive is excluded
    draws = sample_negatives(positive, anchor_labels, unknown, 2000, generator=g)
    assert (draws != positive[:, None]).all() and (labels_table[draws] == anchor_labels[:, None]).any()


def test_last_occurrence_matches_a_loop():
    g = torch.Generator().manual_seed(8)
    for m in (1, 7, 64):
        index = torch.randint(0, max(1, m // 3), (m,), generator=g)
        last = {}
        for pos, i in enumerate(index.tolist()):
            last[i] = pos
        assert last_occurrence(index).tolist() == [last[i] for i in index.tolist()]


def test_a_fixed_class_grouping_draws_exactly_what_the_per_step_grouping_draws():
    """With every class known, the grouping built once (the run's path) and the one built per step from the table with
    the positives moved to their classes (the learnt-table path) are the same, so are the draws."""
    table = torch.randint(0, 5, (50,), generator=torch.Generator().manual_seed(9))
    positive = torch.tensor([3, 17, 42, 8])
    fixed = group_by_class(table + 1, int(table.max()) + 2)
    draws = [sample_negatives(positive, table[positive], table, 300, generator=torch.Generator().manual_seed(10),
                              grouping=grouping) for grouping in (fixed, None)]
    assert torch.equal(draws[0], draws[1])
    assert (table[draws[0]] != table[positive][:, None]).all()


class _Sorts(TorchDispatchMode):
    """Sizes of the tensors sorted (sort / argsort) while active."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ('sort', 'argsort'):
            self.sizes.append(args[0].numel())
        return func(*args, **(kwargs or {}))


def test_a_step_with_given_labels_sorts_no_training_set_size_tensor():
    """ImageNet scale: the negatives of a run whose data set gives its labels come from a grouping made once in
    setup; a step sorts only batch-size tensors (the bank update's deduplication)."""
    n = 1000
    info = RunInfo(num_classes=N_CLASSES, num_samples=n)
    info.train_labels = torch.arange(n) % N_CLASSES
    loss = create_loss('crd', feat_dim=FEAT, nce_k=16)
    loss.setup(Features(pooled=torch.zeros(2, D_S)), Features(pooled=torch.zeros(2, D_T)), info)
    index = torch.tensor([5, 99, 500, 7])
    with _Sorts() as sorts:
        for _ in range(2):
            loss(Features(pooled=torch.randn(4, D_S)), Features(pooled=torch.randn(4, D_T)),
                 make_batch(index, info.train_labels[index]))
    assert sorts.sizes and max(sorts.sizes) == 4, sorts.sizes


def test_label_table_learnt_from_batches_or_given():
    loss = make_crd()
    assert (loss.sample_labels == -1).all()
    index = torch.tensor([1, 2, 3, 9])
    labels = torch.tensor([3, 0, 2, 1])
    loss(Features(pooled=torch.randn(4, D_S)), Features(pooled=torch.randn(4, D_T)), make_batch(index, labels))
    assert loss.sample_labels[index].tolist() == labels.tolist()
    info = RunInfo(num_classes=N_CLASSES, num_samples=N_SAMPLES)
    info.train_labels = torch.arange(N_SAMPLES) % N_CLASSES
    given = create_loss('crd', feat_dim=FEAT, nce_k=16)
    given.setup(Features(pooled=torch.zeros(2, D_S)), Features(pooled=torch.zeros(2, D_T)), info)
    assert torch.equal(given.sample_labels, info.train_labels)


def test_mixup_uses_the_dominant_image():
    loss = make_crd()
    seen = record_contrast(loss)
    index = torch.tensor([1, 2, 3, 9])
    labels = torch.tensor([0, 1, 2, 3])
    before = loss.memory_s.clone()
    loss(Features(pooled=torch.randn(4, D_S)), Features(pooled=torch.randn(4, D_T)), make_batch(index, labels, 0.3))
    assert seen[0][:, 0].tolist() == [9, 3, 2, 1]  # λ < 0.5: the partner B−1−i dominates
    flipped_labels = labels.flip(0)
    assert (loss.sample_labels[seen[0][:, 1:]] != flipped_labels[:, None]).all()
    assert loss.sample_labels[index].tolist() == labels.tolist()  # the table keeps each image's own class
    changed = torch.nonzero((loss.memory_s != before).any(dim=1)).flatten().tolist()
    assert changed == [1, 2, 3, 9]
    loss(Features(pooled=torch.randn(4, D_S)), Features(pooled=torch.randn(4, D_T)), make_batch(index, labels, 0.7))
    assert seen[1][:, 0].tolist() == [1, 2, 3, 9]


def test_banks_and_z_in_state_dict_and_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file
    loss = make_crd()
    loss(Features(pooled=torch.randn(4, D_S)), Features(pooled=torch.randn(4, D_T)), make_batch(torch.arange(4)))
    state = loss.state_dict()
    for key in ('memory_s', 'memory_t', 'z_s', 'z_t', 'sample_labels', 'embed_s.weight', 'embed_t.weight'):
        assert key in state, key
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / 'crd.safetensors'))
    fresh = create_loss('crd', feat_dim=FEAT, nce_k=16)
    torch.manual_seed(5)
    fresh.setup(Features(pooled=torch.zeros(2, D_S)), Features(pooled=torch.zeros(2, D_T)),
                RunInfo(num_classes=N_CLASSES, num_samples=N_SAMPLES))
    assert fresh.z_s.item() < 0
    fresh.load_state_dict(load_file(str(tmp_path / 'crd.safetensors')), strict=True)
    assert fresh.z_s.item() == loss.z_s.item() and torch.equal(fresh.memory_t, loss.memory_t)


def test_distiller_keeps_banks_out_of_ddp_broadcast():
    torch.manual_seed(0)
    student = create_student('deit_ti_distilled', 10, img_size=32, patch_size=4, depth=2, embed_dim=48, num_heads=2)
    teacher = create_teacher('regnety_002', 10, pretrained=False)
    d = Distiller(student, teacher, [LossEntry(create_loss('crd', nce_k=32), 0.8)],
                  RunInfo(num_classes=10, input_size=(3, 32, 32), num_samples=50))
    ignored = set(d._ddp_params_and_buffers_to_ignore)
    assert ignored == {'losses.crd.memory_s', 'losses.crd.memory_t', 'losses.crd.z_s', 'losses.crd.z_t',
                       'losses.crd.sample_labels'}
    assert ignored <= {n for n, _ in d.named_buffers()}
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = d(Batch(x, F.one_hot(y, 10).float(), y, index=torch.tensor([0, 1, 2, 3])))
    out['loss'].backward()
    assert d.losses.crd.embed_s.weight.grad is not None and d.losses.crd.embed_t.weight.grad is not None
    assert torch.isfinite(out['terms']['crd.crd'])


# ---------------------------------------------------------------- two processes (gloo) ----------------------------

STEPS = 3


def _rank_batch(step, rank):
    g = torch.Generator().manual_seed(100 * step + rank)
    # duplicates within a rank (rank 1) and across ranks (index 2 on both, 0 on both at step 0)
    index = [torch.tensor([0, 1, 2, 10 + step]), torch.tensor([2, 5, 5, 0 + 7 * step])][rank]
    return torch.randn(4, D_S, generator=g), torch.randn(4, D_T, generator=g), index


class _Holder(torch.nn.Module):
    def __init__(self, loss):
        super().__init__()
        self.crd = loss
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.register_buffer('probe', torch.zeros(1))  # a normal buffer: DDP broadcasts it

    def forward(self):
        return self.weight.sum()


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    try:
        loss = make_crd()  # same seed: same heads on both ranks (DDP would sync them)
        with torch.no_grad():
            if rank == 1:  # ranks are seeded differently in real runs: the first step must broadcast rank 0's banks
                loss.memory_s.uniform_(-1, 1)
                loss.memory_t.uniform_(-1, 1)
        torch.manual_seed(1234 + rank)  # different negatives per rank
        contrast = record_contrast(loss)
        updates = []
        original = loss.update_banks

        def update(index, v_s, v_t):
            updates.append((loss.memory_s.clone(), loss.memory_t.clone(), index.clone(), v_s.clone(), v_t.clone()))
            original(index, v_s, v_t)
        loss.update_banks = update
        for step in range(STEPS):
            f_s, f_t, index = _rank_batch(step, rank)
            loss(Features(pooled=f_s), Features(pooled=f_t), make_batch(index))
        # the gather helpers: uneven sizes and gradients
        x = torch.arange(rank + 2, dtype=torch.float64, requires_grad=True)
        gathered = vdist.all_gather_with_grad(x)
        (gathered * torch.arange(1.0, gathered.numel() + 1, dtype=torch.float64)).sum().backward()
        # DDP honours the ignore list: a diverged bank row survives a DDP forward, a plain buffer is overwritten
        holder = _Holder(loss)
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            holder, [f'crd.{b}' for b in loss.ddp_ignored_buffers()])
        with torch.no_grad():
            holder.probe.fill_(rank + 1)
            if rank == 1:
                loss.memory_s[0] += 1
        ddp = torch.nn.parallel.DistributedDataParallel(holder)
        ddp()
        torch.save({'memory_s': loss.memory_s.clone(), 'memory_t': loss.memory_t.clone(), 'z_s': loss.z_s.clone(),
                    'z_t': loss.z_t.clone(), 'labels': loss.sample_labels.clone(), 'contrast': contrast,
                    'updates': updates, 'gathered': gathered.detach(), 'grad': x.grad, 'probe': holder.probe.clone(),
                    'row0': loss.memory_s[0].clone()}, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_processes_hold_identical_banks(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    # the banks at the first update are rank 0's initial banks on both ranks (broadcast once)
    assert torch.equal(r0['updates'][0][0], r1['updates'][0][0])
    assert torch.equal(r0['updates'][0][1], r1['updates'][0][1])
    # identical Z and label tables; banks identical before the DDP check diverged row 0 on rank 1
    assert r0['z_s'] == r1['z_s'] and r0['z_t'] == r1['z_t'] and torch.equal(r0['labels'], r1['labels'])
    rows = torch.arange(1, N_SAMPLES)
    assert torch.equal(r0['memory_s'][rows], r1['memory_s'][rows]) and torch.equal(r0['memory_t'], r1['memory_t'])
    # single-process reference on the concatenated (rank-major) batches, duplicates: last occurrence wins
    mem_s = r0['updates'][0][0].double().numpy().copy()
    mem_t = r0['updates'][0][1].double().numpy().copy()
    for step in range(STEPS):
        index = torch.cat([r0['updates'][step][2], r1['updates'][step][2]]).tolist()
        v_s = np.concatenate([r0['updates'][step][3].double().numpy(), r1['updates'][step][3].double().numpy()])
        v_t = np.concatenate([r0['updates'][step][4].double().numpy(), r1['updates'][step][4].double().numpy()])
        assert np.allclose(mem_s, r0['updates'][step][0].double().numpy(), atol=1e-6)
        last = {i: pos for pos, i in enumerate(index)}
        new_s, new_t = mem_s.copy(), mem_t.copy()
        for i, pos in last.items():
            new_s[i] = np_normalize(0.5 * mem_s[i] + 0.5 * v_s[pos])
            new_t[i] = np_normalize(0.5 * mem_t[i] + 0.5 * v_t[pos])
        mem_s, mem_t = new_s, new_t
    np.testing.assert_allclose(r0['memory_s'][rows].double().numpy(), mem_s[1:], atol=1e-6)
    np.testing.assert_allclose(r0['memory_t'].double().numpy(), mem_t, atol=1e-6)
    # Z = N · mean of the first step's scores over both ranks' batches
    m_t0 = r0['updates'][0][1].double().numpy()
    scores = []
    for r in (r0, r1):
        J, v_s = r['contrast'][0].numpy(), r['updates'][0][3].double().numpy()
        scores += [math.exp(m_t0[J[b, k]] @ v_s[b] / 0.07) for b in range(J.shape[0]) for k in range(J.shape[1])]
    assert r0['z_s'].item() == pytest.approx(N_SAMPLES * np.mean(scores), rel=1e-5)
    # gather helpers: rank-major concatenation of uneven sizes; gradient = Σ over ranks of the upstream gradient
    assert r0['gathered'].tolist() == [0, 1, 0, 1, 2] == r1['gathered'].tolist()
    assert r0['grad'].tolist() == [2 * 1, 2 * 2] and r1['grad'].tolist() == [2 * 3, 2 * 4, 2 * 5]
    # DDP: the ignored bank kept rank 1's divergence, the plain buffer got rank 0's value
    assert not torch.equal(r0['row0'], r1['row0'])
    assert r0['probe'].item() == 1 and r1['probe'].item() == 1
