"""arpo_trl sets a passive OpenMP wait policy before torch loads (arpo_trl/__init__.py), unless the user set one."""

import os
import subprocess
import sys

# Records OMP_WAIT_POLICY at the moment torch is first looked up (libgomp reads it when torch loads), then imports
# arpo_trl as a user's script would.
PROBE = """
import os, sys
seen = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
        return None
sys.meta_path.insert(0, Watch())
import arpo_trl
print(seen[0], os.environ.get("OMP_WAIT_POLICY"))
"""


def probe(**env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, "HF_HUB_OFFLINE": "1", **env},
                         capture_output=True, text=True, timeout=600, check=True)  # fmt: skip
    return out.stdout.split()[-2:]


def test_passive_before_torch_loads():
    assert probe() == ["PASSIVE", "PASSIVE"]


def test_a_policy_the_user_set_wins():
    assert probe(OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE", "ACTIVE"]
