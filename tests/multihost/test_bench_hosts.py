"""bench/scaling.py's 2-host points: one sweep point launched with torchrun on each of the two
hosts (network namespaces), so the sweep's cluster path cannot rot."""
from __future__ import annotations

import pytest

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(300)]


def test_a_scaling_point_across_two_hosts_measures_its_collectives_over_the_link(cluster, tmp_path):
    from bench.scaling import launch_point

    def launch():
        return launch_point(2, 2, 2, "widenet-digits", 4, 2, 1, ["model.depth=2"], tmp_path / "p.json", profile=1,
                            timeout=120, cluster=cluster)

    try:
        r = launch()
    except RuntimeError as e:
        # torch's profiler has aborted a rank as it stopped ("terminate called without an active
        # exception", SIGABRT; 1 CI run in 4 on 2026-12-04): a crash inside torch, not in the sweep,
        # so one more try; any other failure, or the same crash twice, fails the test
        if "SIGABRT" not in str(e):
            raise
        r = launch()
    assert r["hosts"] == 2 and r["world"] == 2 and r["ep_size"] == 2 and r["images_per_s"] > 0
    assert [rank["host"] for rank in r["ranks"]] == ["node0", "node1"]  # one rank per host: ep 2 spans the link
    for rank in r["ranks"]:
        assert rank["collectives"]["all_to_all"] > 0 and rank["collectives"]["all_reduce"] > 0
