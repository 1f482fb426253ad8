import json

import pytest

from maskpipe.jobs.cli import main
from maskpipe.pipeline.config import load_config
from maskpipe.pipeline.run.publish import publish
from maskpipe.pipeline.run.runner import run
from tests.conftest import FIXTURES, MICRO

pytest.importorskip("lm_eval", reason="the [lm-eval] extra")  # installed in CI by pip install -e '.[dev]'

MODEL = ["--model", str(MICRO), "--dtype", "float32", "--device", "cpu"]
TASKS = ["--include-path", "configs/lm_eval", "--tasks", "maskpipe_passkey_choice", "maskpipe_kjv_cloze"]
MAGNITUDE = FIXTURES / "artifacts" / "micro-llama-magnitude-2of4-v1"


def error_lines(capsys) -> tuple[list[str], str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")], err


@pytest.mark.slow
def test_lm_eval_scores_a_masked_variant_exactly_as_its_exported_model(in_root, tmp_path, capsys):
    out = tmp_path / "scores"
    assert main(["lm-eval", *MODEL, "--masks", str(MAGNITUDE), "--dense", *TASKS, "--limit", "12",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| variant | maskpipe_passkey_choice | maskpipe_kjv_cloze | mean |" in printed
    assert "| dense |" in printed and f"| {MAGNITUDE.name} |" in printed
    results = json.loads((out / "results.json").read_text())["lm_eval"]
    dense, masked = results["dense"], results[MAGNITUDE.name]
    assert dense["maskpipe_passkey_choice"]["n"] == 12 and dense["maskpipe_kjv_cloze"]["num_fewshot"] == 0
    assert dense["maskpipe_passkey_choice"]["acc"] >= 0.9  # micro-llama was trained on this template
    assert {"acc", "acc_stderr", "acc_norm"} <= set(masked["maskpipe_kjv_cloze"])
    # the in-memory variant is the model `apply --out` writes: lm-eval on that directory agrees exactly
    assert main(["apply", *MODEL, "--masks", str(MAGNITUDE), "--out", str(tmp_path / "sparse")]) == 0
    exported = tmp_path / "exported"
    assert main(["lm-eval", "--model", str(tmp_path / "sparse"), "--dtype", "float32", "--device", "cpu", *TASKS,
                 "--limit", "12", "--out", str(exported)]) == 0
    again = json.loads((exported / "results.json").read_text())["lm_eval"]["dense"]
    for task in masked:
        assert again[task]["acc"] == masked[task]["acc"] and again[task]["acc_norm"] == masked[task]["acc_norm"]


def test_bundled_tasks_read_their_data_beside_the_yaml_from_any_cwd_and_log_lm_evals_own_samples(
        tmp_path, monkeypatch, capsys):
    from tests.conftest import ROOT

    monkeypatch.chdir(tmp_path)  # not the repository root: data_files resolve against the YAML's folder
    out = tmp_path / "scores"
    assert main(["lm-eval", *MODEL, "--include-path", str(ROOT / "configs" / "lm_eval"), "--tasks",
                 "maskpipe_kjv_cloze", "maskpipe_passkey_choice", "--limit", "4", "--batch-size", "auto",
                 "--log-samples", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())["lm_eval"]["dense"]
    cloze, passkey = results["maskpipe_kjv_cloze"], results["maskpipe_passkey_choice"]
    # the table shows acc_norm where a task has it
    assert f"| dense | {100 * cloze['acc_norm']:.1f} | {100 * passkey['acc_norm']:.1f} |" in printed
    assert "metric acc_norm (%" in printed
    # lm-eval's own files, written by its EvaluationTracker
    aggregated = list((out / "lm_eval" / "dense").rglob("results_*.json"))
    assert len(aggregated) == 1
    assert json.loads(aggregated[0].read_text())["results"]["maskpipe_kjv_cloze"]["acc_norm,none"] == cloze["acc_norm"]
    for task in ("maskpipe_kjv_cloze", "maskpipe_passkey_choice"):
        (samples,) = (out / "lm_eval" / "dense").rglob(f"samples_{task}_*.jsonl")
        assert len(samples.read_text().splitlines()) == 4


def test_the_table_shows_acc_norm_where_a_task_has_it_else_acc():
    from maskpipe.pipeline.eval.zeroshot import primary
    from maskpipe.pipeline.run.results import zeroshot_table

    assert primary({"acc": 0.5, "acc_norm": 0.6, "n": 4}) == ("acc_norm", 0.6)
    assert primary({"acc": 0.5, "acc_stderr": 0.1, "n": 4}) == ("acc", 0.5)
    table = zeroshot_table({"dense": {"hellaswag": {"acc": 0.5, "acc_norm": 0.6, "n": 4, "num_fewshot": 0},
                                      "rte": {"acc": 0.7, "n": 5, "num_fewshot": 0}}})
    assert "| dense | 60.0 | 70.0 | 65.0 |" in table
    assert "metric per task hellaswag acc_norm, rte acc" in table


def test_an_unknown_task_or_unreadable_data_is_one_error_before_the_model_loads(in_root, tmp_path, capsys):
    assert main(["lm-eval", *MODEL, "--include-path", "configs/lm_eval", "--tasks", "maskpipe_kjv_cloze", "no_such_task",
                 "--out", str(tmp_path / "a")]) == 2
    errors, err = error_lines(capsys)
    assert errors == ["error: --tasks: no_such_task: no such lm-eval task in its registry or under configs/lm_eval"]
    assert "Loading weights" not in err and not (tmp_path / "a").exists()
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "gone.yaml").write_text((in_root / "configs/lm_eval/kjv_cloze.yaml").read_text()
                                     .replace("maskpipe_kjv_cloze", "gone").replace("kjv_cloze.jsonl", "missing.jsonl"))
    assert main(["lm-eval", *MODEL, "--include-path", str(tasks), "--tasks", "gone", "--out", str(tmp_path / "b")]) == 2
    errors, err = error_lines(capsys)
    assert len(errors) == 1 and errors[0].startswith("error: --tasks: gone: its data cannot be loaded (")
    assert "Loading weights" not in err and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_a_run_with_an_lm_eval_stage_tables_dense_oneshot_and_learned_masks_and_the_card_shows_it(in_root, tmp_path):
    cfg = load_config("configs/tiny-lm-eval.yaml", ["stages.3.tasks=[maskpipe_passkey_choice]", "stages.3.limit=8",
                                                    "stages.2.steps=4", "stages.1.n_samples=4",
                                                    f"output_dir={tmp_path}"])
    run_dir = run(cfg, tmp_path / "run")
    results = json.loads((run_dir / "results.json").read_text())["lm_eval"]
    assert set(results) == {"dense", "magnitude", "sparsegpt", "maskllm"}
    assert all(r["maskpipe_passkey_choice"]["n"] == 8 for r in results.values())
    table = (run_dir / "results.md").read_text()
    assert "| variant | maskpipe_passkey_choice | mean |" in table and "| maskllm |" in table
    card = (publish(run_dir / "artifacts" / "maskllm", run_dir, tmp_path / "hub") / "README.md").read_text()
    assert "### Zero-shot tasks" in card and "| **maskllm (this artifact)** |" in card and "| magnitude |" in card
    assert "vLLM" in card  # what serving engines do with the exported model


def test_a_run_refuses_an_lm_eval_task_before_any_stage_runs(in_root, tmp_path):
    from maskpipe.pipeline import MaskpipeError

    cfg = load_config("configs/tiny-lm-eval.yaml", ["stages.3.tasks=[nope]", f"output_dir={tmp_path}"])
    with pytest.raises(MaskpipeError, match=r"^stages\.3\.tasks: nope: no such lm-eval task"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "artifacts").exists()
