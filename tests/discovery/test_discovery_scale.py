"""experiments/discovery_scale.py --quick into a tmp dir: every step timed, the regions counted, and the OS
map holding more of the object's mass than the FS map. No timing is asserted."""
import json

import pytest


@pytest.mark.slow
def test_quick_scale_run_writes_every_step(tmp_path):
    from experiments import discovery_scale

    assert discovery_scale.main(["--quick", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "discovery_scale.json").read_text())
    steps = [r["step"] for r in out["steps"]]
    assert steps[0].startswith("pass 1") and any(s.startswith("Katz") for s in steps)
    assert all(r["seconds"] > 0 and r["peak_rss_mb"] > 0 for r in out["steps"])
    q = out["quality"]
    assert q["images"] == 300 and q["regions"] > 3 * 300
    assert q["os_precision_mean"] > q["fs_precision_mean"]
