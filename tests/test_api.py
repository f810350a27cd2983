"""The library API as the README shows it: the README's two training loops run as written, train the same weights,
and the command's loop (``vitkd.engine.train_one_epoch``) gives the same loss terms on the same batch."""
import copy
import re
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

import vitkd
from vitkd.data import BatchMixer
from vitkd.distiller import Distiller
from vitkd.engine import TrainState, train_one_epoch
from vitkd.training import EpochBatches, NonFiniteGuard

README = Path(__file__).resolve().parents[1] / 'README.md'


def readme_loops() -> list[str]:
    """The python blocks of the README's "Your own training loop" section, in order."""
    text = README.read_text()
    section = text.split('### Your own training loop\n', 1)[1].split('\n## ', 1)[0]
    return re.findall(r'```python\n(.*?)```', section, flags=re.S)


@pytest.fixture(scope='module')
def loops():
    """Both README blocks run as a reader runs them: the second continues the first's session."""
    plain, accelerated = readme_loops()
    session = {'__name__': 'readme'}
    exec(compile(plain, 'README.md (plain loop)', 'exec'), session)
    first = dict(session)
    exec(compile(accelerated, 'README.md (Accelerate loop)', 'exec'), session)
    return first, session


def test_the_readme_has_the_two_loops():
    blocks = readme_loops()
    assert len(blocks) == 2 and 'vitkd.create_distillation(' in blocks[0] and 'Accelerator()' in blocks[1]


def test_the_build_gives_the_teacher_the_student_and_the_criterion_that_owns_it(loops):
    plain, _ = loops
    teacher, student, criterion = plain['teacher'], plain['student'], plain['criterion']
    assert isinstance(criterion, Distiller) and criterion.student is student
    assert teacher is criterion.teacher and not any(p is q for p in teacher.model.parameters()
                                                    for q in criterion.parameters())
    assert 'vkd' in criterion.losses and any(n.startswith('losses.vkd.') for n, _ in criterion.named_parameters())
    assert set(plain['out']['terms']) == {'task', 'vkd.repr', 'vkd.kl'}


def test_both_readme_loops_train_the_same_weights(loops):
    """Same seed, same batches, fp32 on the CPU: Accelerate's prepare/autocast/backward change nothing numerically."""
    plain, accelerated = loops
    trained = plain['criterion'].state_dict()
    other = accelerated['accelerator'].unwrap_model(accelerated['criterion']).state_dict()
    assert trained.keys() == other.keys()
    assert all(torch.equal(trained[k], other[k]) for k in trained)
    assert any(not torch.equal(trained[k], v) for k, v in vitkd.create_distillation(plain['cfg'], num_classes=10)
               .criterion.state_dict().items())  # ... and they did train


def test_the_engine_gives_the_readme_criterion_s_terms_on_the_same_batch(loops):
    """One step of ``vitkd.engine.train_one_epoch`` on a copy of the README's trained criterion, on the README's last
    batch: the terms it logs are the criterion's forward on that batch (the engine adds no loss of its own)."""
    plain, _ = loops
    cfg, criterion = plain['cfg'], plain['criterion']
    images, labels = plain['images'], plain['labels']
    engine_model = copy.deepcopy(criterion)
    object.__setattr__(engine_model, 'teacher', criterion.teacher)
    with torch.no_grad():
        expected = criterion(vitkd.Batch.from_labels(images, labels, 10, cfg.smoothing, progress=0.0))

    indexed = TensorDataset(images, labels, torch.arange(len(labels)))
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(engine_model.parameters(), lr=0.0)
    scheduler = type('NoSchedule', (), {'step_update': lambda self, num_updates: None})()
    records = []
    train_one_epoch(engine_model, EpochBatches(DataLoader(indexed, len(labels)), accelerator, BatchMixer(cfg, 10)),
                    optimizer, scheduler, accelerator, TrainState(max_steps=1), NonFiniteGuard('stop', engine_model,
                                                                                               accelerator),
                    log_every=1, log_fn=records.append)
    logged = records[0]
    terms = {'loss': expected['loss'], **expected['terms']}
    assert set(terms) <= set(logged)
    for name, value in terms.items():  # the meter sums value·B and divides by B in fp32: a few ulps at most
        assert logged[name] == pytest.approx(value.item(), rel=4 * torch.finfo(torch.float32).eps), name
