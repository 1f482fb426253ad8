"""`maskpipe tune`: the tune section of a config, the trial recipes, the result table, and a real sweep
of 2 tiny trials on a local Ray cluster."""

import copy
import json

import pytest

from maskpipe.cluster import connect  # before Ray is imported: it sets how clients authenticate

from maskpipe.pipeline.config import config_from_dict, search_spec
from maskpipe.pipeline.core.schema import ConfigError
from maskpipe.pipeline.stages.learn import LearnStage
from maskpipe.pipeline.run.tune import reference_config, summarize, trial_config, tune_table
from tests.conftest import CORPORA, MICRO

BASE = {
    "name": "t", "seed": 0,
    "model": {"name_or_path": str(MICRO), "dtype": "float32", "device": "cpu"},
    "data": {"calib": {"sources": [str(CORPORA / "kjv.train.txt")]},
             "kjv": {"sources": [{"path": str(CORPORA / "kjv.valid.txt"), "sample_by": "document"}]}},
    "stages": [
        {"stage": "oneshot", "method": "magnitude"},
        {"stage": "oneshot", "method": "wanda", "data": "calib", "n_samples": 4, "seqlen": 64},
        {"stage": "oneshot", "method": "dsnot", "mask_from": "wanda", "data": "calib", "n_samples": 4, "seqlen": 64},
        {"stage": "learn", "name": "maskllm", "data": "calib", "prior": {"stage": "dsnot", "strength": 10},
         "steps": 100, "batch_size": 2, "seqlen": 64, "lr": 1e-3},
        {"stage": "eval", "data": ["kjv"], "seqlen": 64},
    ],
    "tune": {"stage": "maskllm", "metric": {"data": "kjv", "seqlen": 64, "batch_size": 4},
             "space": {"lr": {"loguniform": [1e-3, 1e-2]}, "prior.strength": [3, 10], "steps": 2}},
}


def tune_error(**tune) -> str:
    raw = copy.deepcopy(BASE)
    raw["tune"].update(tune)
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, "f.yaml")
    return str(e.value)


@pytest.mark.parametrize("tune, expected", [
    (dict(stage="wanda"), "f.yaml: tune.stage: no learn stage named 'wanda'"),
    (dict(metric={"data": "nope"}), "f.yaml: tune.metric.data: no corpus named 'nope'"),
    (dict(space={"lrr": [1, 2]}), "f.yaml: tune.space.lrr: unknown key"),
    (dict(space={"lr": {"loguniform": [0, 1]}}), "f.yaml: tune.space.lr: loguniform needs [low, high] with 0 < low"),
    (dict(space={"lr": {"uniform": [2, 1]}}), "f.yaml: tune.space.lr: uniform needs [low, high] with low < high"),
    (dict(space={"lr": {"choice": []}}), "f.yaml: tune.space.lr: choice needs a non-empty list"),
    (dict(space={"lr": [1e-3, -1]}), "f.yaml: tune.space.lr: Input should be greater than 0 (value -1)"),
    (dict(space={"tau": [4, 0.05]}), "f.yaml: tune.space.tau: Input should be a valid tuple (value 4)"),
    (dict(space={"prior.stage": ["magnitude", "eval"]}), "f.yaml: tune.space.prior.stage: no stage named 'eval' before maskllm"),
    (dict(space={"name": ["a"]}), "f.yaml: tune.space.name: the stage's kind and name are not tunable"),
    (dict(space={}), "f.yaml: tune.space: Dictionary should have at least 1 item"),
    (dict(num_samples=0), "f.yaml: tune.num_samples: Input should be greater than 0"),
])
def test_tune_section_errors_name_the_key(tune, expected):
    assert expected in tune_error(**tune)


def test_search_specs_and_nested_keys():
    assert search_spec([1, 2]) == ("grid", [1, 2])
    assert search_spec({"grid": [[4, 0.05]]}) == ("grid", [[4, 0.05]])  # how a list value is fixed
    assert search_spec({"randint": [1, 5]}) == ("randint", [1, 5])
    assert search_spec(40) == ("fixed", 40)
    raw = copy.deepcopy(BASE)
    raw["tune"]["space"] = {"prior": {"strength": [3, 10]}, "tau": {"choice": [[4, 0.05], [2, 0.05]]}}
    cfg = config_from_dict(raw)
    assert cfg.tune.space == {"prior.strength": [3, 10], "tau": {"choice": [[4, 0.05], [2, 0.05]]}}


def test_reference_runs_only_what_the_tuned_stage_depends_on(tmp_path):
    cfg = config_from_dict(BASE)
    ref = reference_config(cfg)
    assert [s.name for s in ref.stages] == ["wanda", "dsnot", "tune-metric"]
    assert ref.tune is None and ref.stages[-1].dense and ref.stages[-1].masks == "all"
    assert ref.stages[-1].data == ["kjv"] and ref.stages[-1].seqlen == 64


def test_a_trial_is_the_learn_stage_with_its_values_and_the_reference_prior(tmp_path):
    cfg = config_from_dict(BASE)
    trial = trial_config(cfg, {"lr": 0.005, "prior.strength": 3, "steps": 2}, tmp_path)
    learn, ev = trial.stages
    assert isinstance(learn, LearnStage) and learn.name == "maskllm"
    assert (learn.lr, learn.steps, learn.prior.strength) == (0.005, 2, 3)
    assert learn.prior.stage is None and learn.prior.artifact == str(tmp_path / "artifacts" / "dsnot")
    assert learn.batch_size == 2 and learn.seqlen == 64  # everything else as in the config
    assert ev.data == ["kjv"] and ev.masks == ["maskllm"] and not ev.dense and trial.tune is None


def test_table_sorts_trials_best_first_and_failed_last():
    cfg = config_from_dict(BASE)
    trials = [{"trial": "a", "params": {"lr": 1e-3, "prior.strength": 3, "steps": 2}, "status": "ok", "ppl": 60.0},
              {"trial": "b", "params": {"lr": 5e-3, "prior.strength": 10, "steps": 2}, "status": "error", "ppl": None,
               "error": "RuntimeError: boom"},
              {"trial": "c", "params": {"lr": 2e-3, "prior.strength": 10, "steps": 2}, "status": "ok", "ppl": 55.5}]
    summary = summarize(cfg, trials, {"dense": 50.0, "dsnot": 70.0})
    assert [t["trial"] for t in summary["trials"]] == ["c", "a", "b"] and summary["best"]["trial"] == "c"
    assert summary["best_stage"]["lr"] == 2e-3 and summary["best_stage"]["prior"]["strength"] == 10
    text = tune_table(summary, ["lr", "prior.strength"])
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert rows[0] == "| trial | lr | prior.strength | ppl kjv | tokens | seconds |"
    assert rows[1].startswith("| c (best) | 0.002 | 10 | 55.50 |")
    assert "failed: RuntimeError: boom" in rows[3] and rows[4].startswith("| dense (reference) |")
    assert "Fixed for every trial: steps=2." in text and "lr: 0.002" in text


def test_param_space_is_ray_tunes():
    from ray import tune

    from maskpipe.workers.tune import param_space

    raw = copy.deepcopy(BASE)
    raw["tune"]["space"] |= {"grad_clip": {"choice": [0.5, 1.0]}, "warmup_steps": {"randint": [0, 3]}}
    space = param_space(config_from_dict(raw))
    assert space["prior.strength"] == tune.grid_search([3, 10]) and space["steps"] == 2
    assert isinstance(space["lr"], tune.search.sample.Float) and space["lr"].lower == 1e-3
    assert isinstance(space["grad_clip"], tune.search.sample.Categorical)
    assert isinstance(space["warmup_steps"], tune.search.sample.Integer)


@pytest.mark.slow
def test_maskpipe_tune_runs_two_trials_on_ray_and_writes_one_table(tmp_path, capsys):
    import ray

    from maskpipe.jobs.cli import main

    raw = copy.deepcopy(BASE)
    raw["stages"] = [raw["stages"][1], {**raw["stages"][3], "prior": {"stage": "wanda", "strength": 10}}]
    raw["tune"].update(space={"lr": {"loguniform": [1e-3, 1e-2]}, "prior.strength": [3, 30], "steps": 2,
                              "checkpoint_every": 1}, max_concurrent=2)
    raw["output_dir"] = str(tmp_path)
    path = tmp_path / "tune.yaml"
    path.write_text(json.dumps(raw))
    connect()  # a local instance, as `maskpipe tune` starts without --address
    try:
        assert main(["tune", str(path), "--run-dir", str(tmp_path / "run")]) == 0
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "tune" / "results.json").read_text())
    trials = results["trials"]
    assert len(trials) == 2 and all(t["status"] == "ok" for t in trials)
    assert sorted(t["params"]["prior.strength"] for t in trials) == [3, 30]
    assert [t["ppl"] for t in trials] == sorted(t["ppl"] for t in trials) and results["best"] == trials[0]
    assert set(results["reference"]) == {"dense", "wanda"}
    for t in trials:  # each trial is an ordinary run directory with its learned artifact
        run_dir = tmp_path / "run" / "tune" / "trials" / t["trial"]
        assert t["run_dir"] == str(run_dir) and (run_dir / "artifacts" / "maskllm" / "manifest.json").exists()
        assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
        manifest = json.loads((run_dir / "artifacts" / "maskllm" / "manifest.json").read_text())
        assert manifest["method"]["params"]["lr"] == pytest.approx(t["params"]["lr"])
        assert manifest["method"]["prior"]["strength"] == t["params"]["prior.strength"]
    assert (tmp_path / "run" / "artifacts" / "wanda").is_dir()  # the prior: computed once, in the run directory
    assert (tmp_path / "run" / "tune" / "results.md").read_text() in out
    assert f"best: {trials[0]['params']}" in out
