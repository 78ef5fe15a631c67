"""What the gunicorn master builds once, before it forks the workers.

Every worker gunicorn starts (the first ones, the replacement of a worker that died, the new
ones after SIGHUP) is a fork of the master, and has whatever the master already holds at no
cost. Of the 1.2 s a fresh worker took before it served (bench/bench_restart.py), 0.75 s was
loading the packaged encoder's model (its tokenizer's 128,000 pieces parsed in Python, its
weights unzipped) and 0.3 s importing the app and Flask; with both done here, a worker builds
only what is its own (the encoder's onnxruntime pass, router, runner, guards, metrics).

Only what survives a fork is made here. onnxruntime is never imported: after a process imported
it, its forked children hang when they exit (in onnxruntime's destructors), which would leave
every retired worker hanging until gunicorn kills it. A sentence-transformers encoder (torch's
thread pools do not survive a fork either) and a classifier router are still built by each
worker. Nothing a request touches is made here (no app, no metrics, no connections).
"""

from __future__ import annotations

import gc
import sys

from modules.config_manager import AppConfig


def preload_for_workers(config: AppConfig) -> None:
    """Import the app and build the encoder `config`'s router will ask `build_encoder` for.

    Must run after $PROMETHEUS_MULTIPROC_DIR is set (serve.prepare_metrics_dir): the app's
    import brings in prometheus-client, which reads it once.
    """
    if not config.server.preload_encoder:
        # The master stays as light as it was: the app's modules in it cost every worker's
        # summed RSS some 28 MiB.
        return
    import api_server  # noqa: F401 - the workers' `from api_server import create_app` finds it loaded

    from modules.embedding_router import routed_experts
    from modules.encoding.encoders import PACKAGED_ENCODER, preload_use_model

    router = config.router
    classifier = router.mode == "model" or router.router_type == "classification"
    if classifier or router.model_path != PACKAGED_ENCODER or not routed_experts(config.experts):
        return
    try:
        # Taken by the first UseEncoder each worker builds; the worker adds the onnxruntime pass.
        preload_use_model()
    except Exception as exc:  # noqa: BLE001 - each worker loads it again and reports the failure itself
        print(f"LeMoE: the encoder was not preloaded ({type(exc).__name__}: {exc}); each worker builds its own",
              file=sys.stderr)
        return
    # The tokenizer is some 40 MB of Python objects: left out of the workers' garbage collection,
    # their pages stay shared with the master instead of being copied when a collection visits them.
    gc.freeze()
