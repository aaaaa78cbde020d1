from collections import Counter
import pytest
import torch

from dcp_resume.sampler import ResumableSampler


def _ranks(world_size, **kw):
    return [ResumableSampler(rank=r, world_size=world_size, **kw) for r in range(world_size)]


def _steps(samplers, max_steps=None):
    """Interleave ranks step by step like DDP would; every rank must yield the same number of batches."""
    lengths = {len(s) for s in samplers}
    assert len(lengths) == 1, f"ranks disagree on len: {lengths}"
    iters = [iter(s) for s in samplers]
    out = []
    while max_steps is None or len(out) < max_steps:
        step = [next(it, None) for it in iters]
        if all(b is None for b in step):
            break
        assert all(b is not None for b in step), "ranks yielded different numbers of batches"
        assert all(len(b) > 0 for b in step)
        out.append(step)
    states = [s.state_dict() for s in samplers]
    assert all(st == states[0] for st in states), "state differs between ranks"
    return out


def _flat(steps):
    return [i for step in steps for batch in step for i in batch]


@pytest.mark.parametrize("n,bs,ws", [(100, 8, 2), (96, 8, 2), (19, 4, 2), (12, 3, 3), (13, 3, 3), (5, 4, 1)])
def test_epoch_seen_exactly_once_across_ranks(n, bs, ws):
    samplers = _ranks(ws, num_samples=n, batch_size=bs, seed=3)
    steps = _steps(samplers)
    assert sorted(_flat(steps)) == list(range(n))
    assert len(steps) == -(-n // (bs * ws))
    assert all(s.padding_count == 0 for s in samplers)
    assert all(s.state_dict() == {"epoch": 0, "consumed": n, "seed": 3, "num_samples": n} for s in samplers)
    assert all(len(s) == 0 for s in samplers)


def test_full_batches_are_contiguous_shares_and_last_is_near_even():
    r0, r1 = _ranks(2, num_samples=13, batch_size=4, shuffle=False)
    steps = _steps([r0, r1])
    assert steps == [[[0, 1, 2, 3], [4, 5, 6, 7]], [[8, 9, 10], [11, 12]]]


def test_padding_only_when_fewer_left_than_ranks():
    samplers = _ranks(3, num_samples=7, batch_size=2, seed=1)  # last global batch: 1 sample, 3 ranks
    steps = _steps(samplers)
    seen = Counter(_flat(steps))
    assert set(seen) == set(range(7)) and sum(seen.values()) == 9
    assert all(s.padding_count == 2 for s in samplers)
    order = samplers[0].order()
    assert steps[-1] == [[order[6]], [order[0]], [order[1]]]


def test_drop_last_skips_the_short_global_batch():
    samplers = _ranks(2, num_samples=21, batch_size=4, drop_last=True)
    assert len(samplers[0]) == 2
    steps = _steps(samplers)
    assert len(_flat(steps)) == 16 and len(set(_flat(steps))) == 16
    assert all(len(b) == 4 for step in steps for b in step)


@pytest.mark.parametrize("before,after", [((8, 2), (5, 2)), ((8, 2), (8, 1)), ((4, 2), (7, 1)),
                                          ((3, 1), (4, 3))])
def test_resume_mid_epoch_with_other_batch_and_world_size(before, after):
    n, seed = 101, 5
    first = _ranks(before[1], num_samples=n, batch_size=before[0], seed=seed)
    for s in first:
        s.set_epoch(2)
    done = _steps(first, max_steps=3)
    state = first[0].state_dict()
    assert state == {"epoch": 2, "consumed": 3 * before[0] * before[1], "seed": seed, "num_samples": n}
    assert all(type(v) is int for v in state.values())

    second = _ranks(after[1], num_samples=n, batch_size=after[0], seed=seed)
    for s in second:
        s.load_state_dict(dict(state))
        s.set_epoch(2)  # the training loop's call must not reset a resumed epoch
    rest = _steps(second)
    seen = _flat(done) + _flat(rest)
    assert sorted(seen) == list(range(n)), "a sample was repeated or skipped"
    # and in the order an uninterrupted run walks: contiguous shares, in rank order
    assert seen == first[0].order()
    second[0].set_epoch(3)
    assert second[0].consumed == 0 and len(second[0]) == -(-n // (after[0] * after[1]))


def test_set_epoch_changes_order_deterministically_and_leaves_global_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    s = ResumableSampler(50, 10, seed=9)
    s.set_epoch(1)
    e1 = [i for b in s for i in b]
    s.set_epoch(2)
    e2 = [i for b in s for i in b]
    assert sorted(e1) == sorted(e2) == list(range(50)) and e1 != e2
    t = ResumableSampler(50, 7, seed=9)
    t.set_epoch(1)
    assert [i for b in t for i in b] == e1  # order depends on (seed, epoch) only
    assert ResumableSampler(50, 10, seed=10).order(1) != e1
    assert torch.equal(torch.get_rng_state(), before)
    assert ResumableSampler(6, 4, shuffle=False).order() == list(range(6))


def test_state_advances_at_yield_time():
    s = ResumableSampler(20, 4, rank=1, world_size=2)
    it = iter(s)
    assert s.consumed == 0
    next(it)
    assert s.state_dict()["consumed"] == 8 and len(s) == 2
    next(it)
    next(it)
    assert s.consumed == 20 and next(it, None) is None


def test_load_state_dict_rejects_mismatch():
    s = ResumableSampler(100, 8, seed=1)
    with pytest.raises(ValueError, match="num_samples=90.*num_samples=100"):
        s.load_state_dict({"epoch": 0, "consumed": 8, "seed": 1, "num_samples": 90})
    with pytest.raises(ValueError, match="seed=2.*seed=1"):
        s.load_state_dict({"epoch": 0, "consumed": 8, "seed": 2, "num_samples": 100})
    with pytest.raises(ValueError, match="consumed=101"):
        s.load_state_dict({"epoch": 0, "consumed": 101, "seed": 1, "num_samples": 100})
    with pytest.raises(ValueError, match="missing"):
        s.load_state_dict({"epoch": 0})


def test_works_as_dataloader_batch_sampler():
    data = list(range(100, 130))
    s = ResumableSampler(len(data), 4, rank=0, world_size=2, seed=2)
    loader = torch.utils.data.DataLoader(data, batch_sampler=s, collate_fn=list)
    assert len(loader) == 4
    got = []
    for i, batch in enumerate(loader):
        got += batch
        if i == 1:
            assert s.consumed == 16  # two global steps, as saved after step 2
    assert got == [data[j] for j in s.order()[0:4] + s.order()[8:12] + s.order()[16:20]
                   + s.order()[24:27]]
