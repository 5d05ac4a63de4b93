"""Keyed randomness: values are a pure function of the keys, and the fast evaluation (scalar keys
folded in Python, each key on its own broadcast shape) gives bit for bit the values of the
definition (every key mixed over the full output shape), so earlier runs reproduce exactly."""
from __future__ import annotations

import math

import torch

from ds_widenet import rng

IDS = torch.tensor([3, 0, 2 ** 40 + 7, -5]).view(4, 1, 1)


# The pinned values are integers (hashes) and the uniforms they define, which are exact float32
# numbers ((h + 0.5) / 2**32 is exact in float64, and its rounding to float32 is IEEE): they are the
# same on every CPU. The normals go through libm (log, cos), whose last bit differs between CPUs
# (AMD and Intel disagree by an ulp), so they are compared with Box-Muller evaluated here from the
# pinned hashes, never with recorded floats.
NORMAL_KEYS = [0, 12, 3, 1, torch.tensor([11, 4]).view(2, 1, 1)]
NORMAL_HASHES = {  # hash_keys([*NORMAL_KEYS, salt, element index]) over (2, 2, 2), n_trailing=2
    0x51ED270B: [1349134784, 3724661656, 2490902266, 3939587132, 2961004752, 4289670360, 691548687, 665944976],
    0x2545F491: [1862310344, 1977938405, 363125788, 2841267978, 337958729, 2812944127, 458807377, 1832447427],
}


def _uniform_by_definition(hashes: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    return ((torch.tensor(hashes, dtype=torch.float64) + 0.5) / 2.0 ** 32).to(torch.float32).view(shape)


def test_hashes_are_the_ones_earlier_runs_were_trained_with():
    # recorded from the implementation before the speed-up (commit fd9f063)
    assert rng.hash_keys([2 ** 35, IDS, 9, -3], (4, 1, 1)).flatten().tolist() == \
        [3019276980, 3588161694, 2891374209, 3756534868]
    idx = torch.arange(4).view(2, 2)
    for salt, hashes in NORMAL_HASHES.items():
        assert rng.hash_keys([*NORMAL_KEYS, salt, idx], (2, 2, 2)).flatten().tolist() == hashes


def test_uniforms_are_exactly_the_pinned_hashes_scaled_into_the_unit_interval():
    keys = [0, 12, 3, 1, torch.tensor([11, 4]).view(2, 1, 1), 0x51ED270B]
    expected = _uniform_by_definition(NORMAL_HASHES[0x51ED270B], (2, 2, 2))
    assert torch.equal(rng.keyed_uniform(keys, (2, 2, 2), 2), expected)


def test_normals_are_box_muller_of_the_pinned_uniforms():
    u1 = _uniform_by_definition(NORMAL_HASHES[0x51ED270B], (2, 2, 2))
    u2 = _uniform_by_definition(NORMAL_HASHES[0x2545F491], (2, 2, 2))
    expected = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)  # this CPU's libm, as rng's
    assert torch.equal(rng.keyed_normal(NORMAL_KEYS, (2, 2, 2), 2), expected)


def test_hash_equals_the_full_shape_definition_for_every_kind_of_key():
    tok = torch.arange(6).view(1, 6, 1)
    for keys in ([], [7], [1, 2, 3], [-1, 2 ** 33 + 5], [1, IDS], [IDS, 9], [2 ** 35, IDS, tok, -3],
                 [torch.tensor(2 ** 62), 4]):
        assert torch.equal(rng.hash_keys(keys, (4, 6, 5)), rng.hash_keys_full_shape(keys, (4, 6, 5))), keys
    assert int(rng.hash_keys([0, 1, 2], ())) == int(rng.hash_keys_full_shape([0, 1, 2], ()))


def test_normal_equals_the_full_shape_definition_at_router_noise_shapes():
    ids = torch.tensor([11, 4, 1436]).view(3, 1, 1)
    for keys in ([0, 12, 3, rng.SITE_ROUTER, ids], [0, 0, 2, rng.SITE_ROUTER]):
        shape = (3, 17, 4) if len(keys) == 5 else (51, 4)
        assert torch.equal(rng.keyed_normal(keys, shape, 2), rng.keyed_normal_full_shape(keys, shape, 2))


def test_a_sample_gets_the_same_noise_whatever_else_is_in_its_batch():
    alone = rng.keyed_normal([1, 2, rng.SITE_ROUTER, torch.tensor([5]).view(1, 1, 1)], (1, 9, 4), 2)
    batch = rng.keyed_normal([1, 2, rng.SITE_ROUTER, torch.tensor([8, 5, 0]).view(3, 1, 1)], (3, 9, 4), 2)
    assert torch.equal(alone[0], batch[1])
    assert not torch.equal(batch[0], batch[1])


def test_keyed_normal_is_standard_normal():
    z = rng.keyed_normal([0, 1], (200_000,), 1)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1.0) < 0.01
    u = rng.keyed_uniform([0, 2], (200_000,), 1)
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0 and abs(float(u.mean()) - 0.5) < 0.005


# (seed 0, step 12371202, SITE_MIXUP, first sample 0): element 0 hashes to 2**32 - 96, one of the
# 128 hashes whose (h + 0.5) / 2**32 rounds to 1.0 in float32 (found by a search over steps).
TOP_KEYS = (0, 12371202, rng.SITE_MIXUP, 0)


def test_the_largest_hashes_give_a_uniform_below_one_and_the_others_are_unchanged():
    top = torch.tensor([2 ** 32 - 1, 2 ** 32 - 96, 2 ** 32 - 128])
    assert rng._unit(top).eq(1.0).all()  # the rounding the cap exists for
    below = torch.tensor([2 ** 32 - 129, 2 ** 31, 0])
    assert rng._unit(below).lt(1.0).all()
    assert rng.BELOW_ONE == torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()
    assert torch.tensor(rng.BELOW_ONE, dtype=torch.float32).item() == rng.BELOW_ONE  # a float32 value
    assert float(rng._unit(below)[0]) == rng.BELOW_ONE  # the cap is the value the next hash down has


def test_keyed_uniform_stays_below_one_where_the_hash_rounds_to_one():
    hashes = rng.hash_keys([*TOP_KEYS, torch.arange(2)], (2,))
    assert hashes.tolist() == [4294967200, 2138940601]
    u = rng.keyed_uniform(TOP_KEYS, (2,), 1)
    assert float(u[0]) == rng.BELOW_ONE < 1.0
    assert torch.equal(u[1:], rng._unit(hashes[1:]))  # a value that was not 1.0 is unchanged, bit for bit
