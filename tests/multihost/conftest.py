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


def one_host_reference(tmp_path_factory, name: str, nproc: int, micro: int, *extra: str) -> dict[int, float]:
    """The uninterrupted run on one host (`deepspeed --num_gpus nproc`), global batch 32: step -> loss."""
    if Cluster.unavailable():
        pytest.skip(Cluster.unavailable())
    d = tmp_path_factory.mktemp(name)
    run_train("deepspeed", nproc, RECIPE, ds_config(d, micro=micro), d / "run", [*TINY, *extra])
    ref = trace(d / "run")
    assert sorted(ref) == list(range(1, STEPS + 1))
    return ref


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> dict[int, float]:
    """2 ranks, micro-batch 16."""
    return one_host_reference(tmp_path_factory, "reference", 2, 16)


@pytest.fixture(scope="session")
def reference_4(tmp_path_factory) -> dict[int, float]:
    """4 ranks and ep_size 2, micro-batch 8."""
    return one_host_reference(tmp_path_factory, "reference_4", 4, 8, "parallel.ep_size=2")
