"""Fixtures of the multi-host tests: the cluster (tests/support/cluster.py), built per module and
torn down even when a test fails, and the one-host reference every multi-host run is compared
with. On CI (root, .ci/run installs iproute2, openssh-server and pdsh) these tests run; elsewhere
they skip with the reason."""
from __future__ import annotations

import pytest

from tests.distributed.launch import run_train
from tests.support.cluster import Cluster

from .runs import RECIPE, STEPS, TINY, ds_config, trace


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = Cluster.unavailable()
    if why:
        pytest.skip(why)
    with Cluster.create(tmp_path_factory.mktemp("cluster"), hosts=2) as c:
        yield c


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> dict[int, float]:
    """The run on one host with 2 ranks, uninterrupted: step -> loss."""
    if Cluster.unavailable():
        pytest.skip(Cluster.unavailable())
    d = tmp_path_factory.mktemp("reference")
    run_train("deepspeed", 2, RECIPE, ds_config(d), d / "run", TINY)
    ref = trace(d / "run")
    assert sorted(ref) == list(range(1, STEPS + 1))
    return ref


@pytest.fixture(scope="session")
def reference_4(tmp_path_factory) -> dict[int, float]:
    """The same global batch on one host with 4 ranks and ep_size 2 (micro-batch 8): step -> loss."""
    if Cluster.unavailable():
        pytest.skip(Cluster.unavailable())
    d = tmp_path_factory.mktemp("reference_4")
    run_train("deepspeed", 4, RECIPE, ds_config(d, micro=8), d / "run", [*TINY, "parallel.ep_size=2"])
    ref = trace(d / "run")
    assert sorted(ref) == list(range(1, STEPS + 1))
    return ref
