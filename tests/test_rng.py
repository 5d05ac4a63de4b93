"""Keyed randomness: values are a pure function of the keys, and the fast evaluation (scalar keys
folded in Python, each key on its own broadcast shape) gives bit for bit the values of the
definition (every key mixed over the full output shape), so earlier runs reproduce exactly."""
from __future__ import annotations

import torch

from ds_widenet import rng

IDS = torch.tensor([3, 0, 2 ** 40 + 7, -5]).view(4, 1, 1)


def test_values_are_the_ones_earlier_runs_were_trained_with():
    # recorded from the implementation before the speed-up (commit fd9f063)
    assert rng.hash_keys([2 ** 35, IDS, 9, -3], (4, 1, 1)).flatten().tolist() == \
        [3019276980, 3588161694, 2891374209, 3756534868]
    z = rng.keyed_normal([0, 12, 3, 1, torch.tensor([11, 4]).view(2, 1, 1)], (2, 2, 2), 2).flatten().tolist()
    assert z == [-1.3913058042526245, -0.5174585580825806, 0.89998459815979, -0.2193046659231186,
                 0.7591776847839355, -0.027939768508076668, 1.4965859651565552, -1.7293490171432495]


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
