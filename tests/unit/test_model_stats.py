"""Model statistics: counting, surviving a restart, sharing the file, and atomic writes under kill -9."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from modules.model_pool import ModelPool
from modules.model_stats import (
    ModelCounts,
    ModelStats,
    read_stats_file,
    write_json_atomic,
)

REPO = Path(__file__).resolve().parents[2]


def test_counts_are_written_and_read_back_by_a_new_process(tmp_path: Path) -> None:
    path = tmp_path / "data" / "stats.json"
    stats = ModelStats(path, wall_clock=lambda: 1000.0)
    stats.record_load("/m/a.gguf", 0.5)
    stats.record_request("/m/a.gguf", prompt_tokens=10, completion_tokens=4)
    stats.record_request("/m/a.gguf", prompt_tokens=3, completion_tokens=2)
    stats.record_unload("/m/a.gguf")

    restarted = ModelStats(path)
    a = restarted.snapshot()["/m/a.gguf"]
    assert (a.loads, a.unloads, a.requests) == (1, 1, 2)
    assert (a.prompt_tokens, a.completion_tokens) == (13, 6)
    assert a.load_seconds == pytest.approx(0.5)
    assert a.last_used == 1000.0
    assert json.loads(path.read_text())["version"] == 1


def test_a_restart_adds_to_the_counts_instead_of_starting_over(tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    ModelStats(path).record_load("k", 1.0)
    ModelStats(path).record_load("k", 1.0)
    assert read_stats_file(path)["k"].loads == 2


def test_two_workers_sharing_the_file_do_not_overwrite_each_other(tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    first, second = ModelStats(path), ModelStats(path)
    for _ in range(3):
        first.record_request("k", 1, 1)
        second.record_request("k", 1, 1)
    assert read_stats_file(path)["k"].requests == 6


def test_last_used_keeps_the_latest_time(tmp_path: Path) -> None:
    times = iter([50.0, 20.0])
    stats = ModelStats(tmp_path / "s.json", wall_clock=lambda: next(times))
    stats.record_request("k", 0, 0)
    stats.record_request("k", 0, 0)
    assert read_stats_file(tmp_path / "s.json")["k"].last_used == 50.0


def test_a_damaged_file_is_set_aside_and_counting_starts_again(tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    path.write_text('{"version": 1, "models": {"k": {"loads": 3')
    stats = ModelStats(path)
    assert stats.snapshot() == {}
    stats.record_load("k", 0.1)
    assert read_stats_file(path)["k"].loads == 1
    assert len(list(tmp_path.glob("stats.json.corrupt-*"))) == 1


def test_unknown_fields_from_a_newer_version_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"version": 2, "models": {"k": {"loads": 4, "gpu_seconds": 9}}}))
    assert read_stats_file(path)["k"] == ModelCounts(loads=4)


def test_atomic_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from modules.model_stats import write_json_atomic

    path = Path(sys.argv[1])
    # About 2 MB per generation, so that a kill usually lands in the middle of a write.
    filler = "x" * 2_000_000
    generation = 0
    print("ready", flush=True)
    while True:
        generation += 1
        write_json_atomic(path, {"generation": generation, "filler": filler})
    """
)


@pytest.mark.parametrize("delay", [0.3, 0.55, 0.8])
def test_stats_file_is_intact_after_a_writer_is_killed_mid_write(tmp_path: Path, delay: float) -> None:
    path = tmp_path / "stats.json"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.wait(timeout=10)
    assert writer.returncode == -signal.SIGKILL
    data = json.loads(path.read_text())
    assert data["generation"] >= 1
    assert len(data["filler"]) == 2_000_000
    # The kill may leave a half-written temporary file beside it, never in its place.
    assert all(p.name.startswith(".stats.json.") for p in tmp_path.iterdir() if p.name != "stats.json")


def test_the_pool_counts_loads_unloads_and_requests(tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    pool = ModelPool(max_loaded=1, ttl_seconds=300, stats=ModelStats(path))
    with pool.lease("a", object):
        pool.record_request("a", 7, 3)
    with pool.lease("b", object):  # evicts a
        pass
    counts = read_stats_file(path)
    assert (counts["a"].loads, counts["a"].unloads, counts["a"].requests) == (1, 1, 1)
    assert (counts["a"].prompt_tokens, counts["a"].completion_tokens) == (7, 3)
    assert (counts["b"].loads, counts["b"].unloads) == (1, 0)


def test_a_failed_load_is_not_counted(tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    pool = ModelPool(max_loaded=1, ttl_seconds=300, stats=ModelStats(path))

    def broken() -> object:
        raise OSError("no such file")

    with pytest.raises(OSError), pool.lease("a", broken):
        pass
    assert read_stats_file(path) == {}
