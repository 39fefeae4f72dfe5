"""BucketBatchSampler: determinism, one bucket per batch, probability/repeats, ranks, exact resume.

Run: OMP_NUM_THREADS=1 pytest tests/test_sampler.py -q
Plans are built from Sample objects directly (the sampler never opens files).
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from sana_appliance.core.workspace import Workspace
from sana_appliance.data.backends import parse_data_config
from sana_appliance.data.images import Sample
from sana_appliance.data.plan import DataPlan
from sana_appliance.data.sampler import BucketBatchSampler


def make_plan(tmp_path: Path, datasets: dict[str, dict]) -> DataPlan:
    """datasets: id -> {"buckets": {(w, h): count}, "repeats": r, "probability": p}."""
    workspace = Workspace(root=tmp_path, hf_home=tmp_path / "hf")
    entries = [
        {"id": name, "instance_data_dir": f"datasets/{name}", "repeats": spec.get("repeats", 0),
         "probability": spec.get("probability", 1.0)}
        for name, spec in datasets.items()
    ]
    backends, text = parse_data_config(entries, "test", workspace)
    samples = []
    for name, spec in datasets.items():
        n = 0
        for size, count in spec["buckets"].items():
            for _ in range(count):
                path = tmp_path / "datasets" / name / f"{n:05d}.png"
                samples.append(Sample(name, path, f"caption {n}", size, {"crop_box": [0, 0, *size]}, f"{name}-{n}"))
                n += 1
    return DataPlan(backends, text, samples, [])


def take(sampler: BucketBatchSampler, n: int) -> list[list[int]]:
    return list(islice(iter(sampler), n))


@pytest.fixture
def mixed(tmp_path):
    return make_plan(tmp_path, {
        "photos": {"buckets": {(64, 64): 21, (80, 48): 10, (48, 80): 3}, "repeats": 1},
        "subject": {"buckets": {(64, 64): 5}, "repeats": 3, "probability": 2.0},
    })


def test_deterministic_for_a_seed_and_different_across_seeds(mixed):
    a = take(BucketBatchSampler(mixed, 4, seed=7), 60)
    b = take(BucketBatchSampler(mixed, 4, seed=7), 60)
    c = take(BucketBatchSampler(mixed, 4, seed=8), 60)
    assert a == b and a != c
    # photos: ceil(21*2/4) + ceil(10*2/4) + ceil(3*2/4) = 11 + 5 + 2; subject: 5*4/4 = 5
    assert len(BucketBatchSampler(mixed, 4, seed=7)) == 23
    epoch0, epoch1 = a[:23], a[23:46]
    assert epoch0 != epoch1, "each epoch is shuffled anew"


def test_every_batch_is_one_bucket_and_one_dataset(mixed):
    sampler = BucketBatchSampler(mixed, 4, seed=1)
    for batch in take(sampler, 3 * len(sampler)):
        assert len(batch) == 4
        assert len({mixed.samples[i].size for i in batch}) == 1
        assert len({mixed.samples[i].backend_id for i in batch}) == 1


def test_repeats_give_each_image_repeats_plus_one_passes_per_epoch(mixed):
    sampler = BucketBatchSampler(mixed, 4, seed=3)
    counts = Counter(i for batch in take(sampler, len(sampler)) for i in batch)
    for index, sample in enumerate(mixed.samples):
        passes = mixed.backend(sample.backend_id).repeats + 1
        # Padding to whole batches adds at most one extra use per image.
        assert passes <= counts[index] <= passes + 1, (sample, counts[index])
    # A tiny bucket (3 portrait images) is padded, never dropped.
    assert all(counts[i] >= 2 for i, s in enumerate(mixed.samples) if s.size == (48, 80))


def test_probability_sets_the_mix_and_repeats_set_the_epoch_share(tmp_path):
    plan = make_plan(tmp_path, {
        "big": {"buckets": {(64, 64): 400}, "probability": 3.0},
        "small": {"buckets": {(64, 64): 100}, "repeats": 3, "probability": 1.0},
    })
    big_early = 0
    for seed in range(10):
        sampler = BucketBatchSampler(plan, 4, seed=seed)
        assert len(sampler) == 200  # 100 batches each: 400 x 1 and 100 x (3 + 1)
        source = [plan.samples[b[0]].backend_id for b in take(sampler, 200)]
        assert Counter(source) == {"big": 100, "small": 100}  # repeats decide the epoch share
        big_early += source[:80].count("big")
    assert 0.70 < big_early / 800 < 0.80, big_early  # probability 3:1 decides the mix


def test_ranks_get_disjoint_shares_of_the_same_global_batches(tmp_path):
    plan = make_plan(tmp_path, {"a": {"buckets": {(64, 64): 32, (96, 32): 16}}, "b": {"buckets": {(32, 96): 24}}})
    single = take(BucketBatchSampler(plan, 4, seed=11), 36)
    r0 = take(BucketBatchSampler(plan, 2, seed=11, num_replicas=2, rank=0), 36)
    r1 = take(BucketBatchSampler(plan, 2, seed=11, num_replicas=2, rank=1), 36)
    for whole, a, b in zip(single, r0, r1, strict=True):
        assert a + b == whole
        assert not set(a) & set(b)
        assert plan.samples[a[0]].size == plan.samples[b[0]].size  # ranks step the same bucket
    epoch = len(BucketBatchSampler(plan, 2, seed=11, num_replicas=2))
    seen = [i for batch in r0[:epoch] + r1[:epoch] for i in batch]
    assert sorted(seen) == list(range(len(plan.samples)))  # one epoch covers everything once


@pytest.mark.parametrize("k", [1, 17, 30, 45])
def test_resume_continues_the_exact_sequence(mixed, k):
    reference = take(BucketBatchSampler(mixed, 4, seed=5), k + 40)
    first = BucketBatchSampler(mixed, 4, seed=5)
    assert take(first, k) == reference[:k]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    assert state["epoch"] == k // len(first)
    resumed = BucketBatchSampler(mixed, 4, seed=5)
    resumed.load_state_dict(state)
    assert take(resumed, 40) == reference[k : k + 40]


def test_resume_from_batches_consumed_when_a_loader_prefetched(mixed):
    reference = take(BucketBatchSampler(mixed, 4, seed=5), 30)
    sampler = BucketBatchSampler(mixed, 4, seed=5)
    take(sampler, 14)  # the loader pulled 14, training used 10
    resumed = BucketBatchSampler(mixed, 4, seed=5)
    resumed.load_state_dict(sampler.state_dict(batches_consumed=10))
    assert take(resumed, 20) == reference[10:30]


def test_resume_with_another_gpu_count_keeps_epoch_and_progress(mixed, caplog):
    old = BucketBatchSampler(mixed, 4, seed=5)
    take(old, len(old) + len(old) // 2)
    new = BucketBatchSampler(mixed, 2, seed=5, num_replicas=2, rank=1)
    new.load_state_dict(old.state_dict())  # same global batch: exact
    assert new.batches_done == old.batches_done
    other = BucketBatchSampler(mixed, 4, seed=5, num_replicas=2, rank=0)
    other.load_state_dict(old.state_dict())
    assert other.epoch == 1 and 0 < other.batches_done - len(other) < len(other)
    assert "global_batch_size" in caplog.text
