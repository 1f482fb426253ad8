import json

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
    learn = MetricsLog(run_dir, "learn", cfg.logging, config={"name": "t"})
    for step in (1, 2, 3):
        learn({"step": step, "loss": 1.0 / step, "tau": 4.0})
    learn.close()
    gates = MetricsLog(run_dir, "gates", cfg.logging)  # a later stage (or another process) resumes the same runs
    gates({"resumed_from_step": 0})
    for step in (1, 2):
        gates({"step": step, "distance": 10.0 - step})
    gates.close()
    log_results(run_dir, cfg.logging, {"perplexity": {"dense": {"kjv": {"ppl": 34.5}}}}, "completed")

    ids = json.loads((run_dir / "trackers.json").read_text())
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(ids["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "learn/loss")] == [
        (1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "gates/distance")] == [1, 2]
    assert client.get_metric_history(run.info.run_id, "results/ppl/dense/kjv")[0].value == 34.5
    # W&B offline: one segment per process/stage of the same run id (`wandb sync` merges them); its
    # records are protobuf, whose keys appear verbatim
    records = b"".join(f.read_bytes() for f in (run_dir / "wandb").rglob(f"offline-run-*-{ids['wandb']['id']}/*.wandb"))
    for key in (b"learn/loss", b"learn/step", b"gates/distance", b"ppl/dense/kjv", b"maskpipe-test"):
        assert key in records
    assert [(m["stage"], m["step"]) for m in read_metrics(run_dir / "metrics.jsonl")] == [
        ("learn", 1), ("learn", 2), ("learn", 3), ("gates", 1), ("gates", 2)]
    assert list((run_dir / "tensorboard" / "gates").glob("events.out.tfevents.*"))
