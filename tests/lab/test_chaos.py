"""The short CI variant of the chaos soak (bench/chaos.py runs 30 minutes): two random faults
(seeded, so a failure can be replayed), every service probed throughout. Nothing may be lost,
the cluster must converge by itself, and two Home Assistants never run at once. The figures
(availability per service, every gap with its cause) are printed (`pytest -s`)."""

from __future__ import annotations

import pytest

from lab.chaos import run_chaos

pytestmark = pytest.mark.lab

SEED = 20261203


def test_two_random_faults(lab, cluster, deployed):
    result = run_chaos(cluster, lab, count=2, spacing=(10, 20), hold=(15, 30), after=30,
                       seed=SEED, log=lambda m: print(f"  [chaos] {m}", flush=True))
    print("\n" + "\n".join(result.lines()))
    assert not result.lost, result.lost
    assert result.converged is not None
    assert [o for o in result.report.overlaps if o.service == "homeassistant"] == []
