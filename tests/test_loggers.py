import json
import sys

import pytest

from maskpipe.pipeline.config import config_from_dict
from maskpipe.pipeline.core.schema import ConfigError
from maskpipe.pipeline.io.loggers import MetricsLog, log_results, read_metrics

BASE = {"name": "t", "model": {"name_or_path": "m"}, "stages": [{"stage": "oneshot", "method": "magnitude"}]}


def test_top_level_tensorboard_true_is_logging_tensorboard_and_tracker_keys_are_checked():
    assert config_from_dict({**BASE, "tensorboard": True}).logging.tensorboard
    assert not config_from_dict(BASE).logging.tensorboard
    cfg = config_from_dict({**BASE, "logging": {"wandb": {"project": "p", "mode": "offline"},
                                                "mlflow": {"tracking_uri": "file:/tmp/x"}}})
    assert cfg.logging.wandb.project == "p" and cfg.logging.mlflow.experiment == "maskpipe"
    with pytest.raises(ConfigError, match=r"<config>: logging.wandb.project: Field required"):
        config_from_dict({**BASE, "logging": {"wandb": {}}})
    with pytest.raises(ConfigError, match=r"logging.mlflow.uri: unknown key"):
        config_from_dict({**BASE, "logging": {"mlflow": {"uri": "x"}}})


@pytest.mark.slow
def test_wandb_offline_and_mlflow_file_store_get_every_stage_in_one_run(tmp_path, monkeypatch):
    import mlflow  # noqa: F401  (the real clients run: pip install 'maskpipe[wandb,mlflow]')
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file: stores behind this switch
    uri = (tmp_path / "mlruns").as_uri()
    cfg = config_from_dict({**BASE, "logging": {"tensorboard": True, "wandb": {"project": "maskpipe-test"},
                                                "mlflow": {"tracking_uri": uri, "experiment": "exp"}}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = cfg.model_dump(mode="json")
    learn = MetricsLog(run_dir, "learn", cfg.logging, config=config)
    for step in (1, 2, 3):
        learn({"step": step, "loss": 1.0 / step, "tau": 4.0})
    learn.close()
    gates = MetricsLog(run_dir, "gates", cfg.logging)  # a later stage (or another process) resumes the same runs
    gates({"resumed_from_step": 0})
    for step in (1, 2):
        gates({"step": step, "distance": 10.0 - step})
    gates.close()
    art = run_dir / "artifacts" / "magnitude"
    art.mkdir(parents=True)
    (art / "manifest.json").write_text(json.dumps({"pattern": "2:4", "method": {"name": "magnitude"}}))
    (art / "masks.safetensors").write_bytes(b"masks")
    (run_dir / "results.md").write_text("| variant | PPL kjv |\n| --- | --- |\n| dense | 34.50 |\n")
    results = {"perplexity": {"dense": {"kjv": {"ppl": 34.5}}},
               "retrieval": {"dense": {"passkey-96": {"acc": 1.0}}}, "lm_eval": {"dense": {"rte": {"acc": 0.52}}}}
    log_results(run_dir, cfg.logging, results, "completed", config)

    ids = json.loads((run_dir / "trackers.json").read_text())
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(ids["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "learn/loss")] == [
        (1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "gates/distance")] == [1, 2]
    assert client.get_metric_history(run.info.run_id, "results/ppl/dense/kjv")[0].value == 34.5
    assert client.get_metric_history(run.info.run_id, "results/lm_eval/dense/rte")[0].value == 0.52
    # the resolved config as params, by the key paths overrides use
    assert run.data.params["stages.0.method"] == "magnitude" and run.data.params["model.name_or_path"] == "m"
    assert run.data.params["logging.mlflow.experiment"] == "exp" and run.data.params["sparsity.pattern"] == "2:4"
    # the final tables and the mask artifact
    client.download_artifacts(run.info.run_id, "", str(tmp_path / "back"))
    assert json.loads((tmp_path / "back" / "results.json").read_text()) == results
    assert "| dense | 34.50 |" in (tmp_path / "back" / "results.md").read_text()
    assert (tmp_path / "back" / "artifacts" / "magnitude" / "masks.safetensors").read_bytes() == b"masks"
    # W&B offline: one segment per process/stage of the same run id (`wandb sync` merges them); its
    # records are protobuf, whose keys appear verbatim
    records = b"".join(f.read_bytes() for f in (run_dir / "wandb").rglob(f"offline-run-*-{ids['wandb']['id']}/*.wandb"))
    for key in (b"learn/loss", b"learn/step", b"gates/distance", b"ppl/dense/kjv", b"maskpipe-test",
                b"stages.0.method", b"model.name_or_path", b"run-magnitude", b"masks.safetensors"):
        assert key in records, key
    tables = list((run_dir / "wandb").rglob("results_*.table.json"))
    assert tables and {tuple(r) for r in json.loads(tables[0].read_text())["data"]} == {
        ("ppl", "dense", "kjv", 34.5), ("retrieval", "dense", "passkey-96", 1.0), ("lm_eval", "dense", "rte", 0.52)}
    assert [(m["stage"], m["step"]) for m in read_metrics(run_dir / "metrics.jsonl")] == [
        ("learn", 1), ("learn", 2), ("learn", 3), ("gates", 1), ("gates", 2)]
    assert list((run_dir / "tensorboard" / "gates").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run_dir / "tensorboard" / "results"), size_guidance={"tensors": 0}).Reload()
    assert board.Scalars("ppl/dense/kjv")[0].value == 34.5
    texts = {tag: board.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in board.Tags()["tensors"]}
    assert "stages:" in texts["config/text_summary"] and "| dense | 34.50 |" in texts["results/text_summary"]


def test_tensorboard_without_its_package_is_refused_before_the_run(in_root, monkeypatch, capsys):
    from maskpipe.jobs.cli import main

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard raises ImportError
    assert main(["validate", "configs/tiny.yaml", "tensorboard=true"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: logging.tensorboard: the tensorboard package is not installed "
                   "(pip install 'maskpipe[tensorboard]')\n")
    assert main(["run", "configs/tiny.yaml", "logging.tensorboard=true", "--run-dir", "/nonexistent/x"]) == 2
    assert "logging.tensorboard: the tensorboard package is not installed" in capsys.readouterr().err
