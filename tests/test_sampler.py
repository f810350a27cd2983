"""Repeated augmentation (DeiT's RASampler) through vitkd's global EpochSampler and Accelerate's batch sharding."""
import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from PIL import Image
from torch.utils.data import BatchSampler

from vitkd.build import build_data
from vitkd.config import Config, ConfigError
from vitkd.validate import validate
from vitkd.data import EpochSampler, find_epoch_sampler


def _permutation(n, seed, epoch):
    """The epoch's base permutation, drawn as the sampler documents: randperm seeded from SeedSequence((seed, epoch))."""
    order_seq = np.random.SeedSequence((seed, epoch)).spawn(2)[0]
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(order_seq.generate_state(1, np.uint64)[0])))


def _deit_rank_stream(perm, repeats, world, rank):
    """DeiT's RASampler for one rank, written out: every index ``repeats`` times, padded, then ``[rank::world]``."""
    indices = [int(i) for i in perm for _ in range(repeats)]
    per_rank = -(-len(indices) // world)
    indices += indices[:per_rank * world - len(indices)]
    return indices[rank::world]


def _shard(sampler, batch, world, rank):
    return list(BatchSamplerShard(BatchSampler(sampler, batch, drop_last=True), world, rank))


@pytest.mark.parametrize('world', [1, 2, 3, 4])
def test_each_process_gets_deits_rasampler_split(world):
    n, batch, repeats, seed, epoch = 96, 4, 3, 5, 2
    sampler = EpochSampler(n, seed, repeats, batch, world)
    sampler.set_epoch(epoch)
    perm = _permutation(n, seed, epoch)
    steps = n // (batch * world)
    for rank in range(world):
        got = [[i for i, _ in b] for b in _shard(sampler, batch, world, rank)][:steps]
        deit = _deit_rank_stream(perm, repeats, world, rank)
        assert got == [deit[s * batch:(s + 1) * batch] for s in range(steps)]


def test_copies_have_their_own_augmentation_and_sit_on_different_processes():
    n, batch, repeats, world = 120, 5, 3, 3
    sampler = EpochSampler(n, 0, repeats, batch, world)
    keys = list(sampler)
    assert len(keys) == len(sampler) == n  # the epoch keeps N samples (DeiT's convention)
    counts = np.bincount([i for i, _ in keys], minlength=n)
    assert counts.max() == repeats and (counts == repeats).sum() == n // repeats
    assert len({s for _, s in keys}) == n  # every copy its own seed
    owner = {}
    for rank in range(world):
        for b in _shard(sampler, batch, world, rank):
            for i, _ in b:
                owner.setdefault(i, []).append(rank)
    complete = [ranks for ranks in owner.values() if len(ranks) == repeats]
    assert complete and all(len(set(ranks)) == repeats for ranks in complete)


def test_one_repeat_is_the_plain_shuffled_epoch():
    n, seed, epoch = 50, 7, 3
    sampler = EpochSampler(n, seed)
    sampler.set_epoch(epoch)
    seeds = np.random.SeedSequence((seed, epoch)).spawn(2)[1].generate_state(n, np.uint64)
    assert list(sampler) == [(int(i), int(seeds[i])) for i in _permutation(n, seed, epoch)]


def test_aug_repeats_reaches_the_training_loader(tmp_path):
    for split in ('train', 'val'):
        for c in range(2):
            (tmp_path / split / f'c{c}').mkdir(parents=True)
            for i in range(6):
                Image.new('RGB', (8, 8), (40 * i, 100 * c, 0)).save(tmp_path / split / f'c{c}' / f'{i}.png')
    cfg = Config(dataset='imagefolder', data_path=str(tmp_path), batch_size=4, aug_repeats=3, num_workers=0)
    loader, _, _ = build_data(cfg, (3, 8, 8), (0.5,) * 3, (0.5,) * 3, world_size=2)
    sampler = find_epoch_sampler(loader)
    assert (sampler.repeats, sampler.batch_size, sampler.world_size) == (3, 4, 2)
    seen = [int(i) for _, _, index in loader for i in index]
    assert len(seen) == 12 and max(np.bincount(seen)) == 3


@pytest.mark.parametrize('fields,message', [
    (dict(aug_repeats=0), '--aug-repeats must be an integer >= 1, got 0'),
    (dict(aug_repeats=3, teacher_cache='cache'), '--aug-repeats 3 with --teacher-cache'),
])
def test_bad_aug_repeats_is_a_one_line_error(fields, message):
    with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')):
        validate(Config(**fields))
