"""The cluster fixture: hosts as network namespaces (tests/support/cluster.py), torn down after
each module even when a test fails. On CI (root, .ci/run installs iproute2, openssh-server and
pdsh) these tests run; elsewhere they skip with the reason."""
from __future__ import annotations

import pytest

from tests.support.cluster import Cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = Cluster.unavailable()
    if why:
        pytest.skip(why)
    with Cluster.create(tmp_path_factory.mktemp("cluster"), hosts=2) as c:
        yield c
