"""Nothing lost, ever (#27), for damaged or unexpected inputs: a damaged run directory (config.yaml,
status.json, metrics.jsonl), bad override YAML, binary bytes deep in a corpus, a record of many MB, a
corpus changed between a kill and its resume, relative paths, an incomplete model folder and a run
directory whose name needs quoting. Every case goes through the command line."""

import json
import subprocess
import sys
import time

import pytest
import torch

from maskpipe.jobs.cli import main
from tests.conftest import CORPORA, MODEL_FLAGS, ROOT, cli_fails, stop_at
from tests.test_nothing_lost import die_after_step, learn_recipe


# ------------------------------------------------------------------------------------------- messages


def test_the_resume_line_of_a_stopped_run_is_shell_quoted(tmp_path, monkeypatch, capsys):
    import shlex


    config, run_dir = learn_recipe(tmp_path), tmp_path / "my runs" / "it's r1"
    stop_at(monkeypatch)
    capsys.readouterr()
    assert main(["run", str(config), "--run-dir", str(run_dir)]) == 130
    line = capsys.readouterr().err.split("resume with: ", 1)[1].strip()
    expected = ["maskpipe", "run", str(run_dir / "config.yaml"), "--run-dir", str(run_dir)]
    assert shlex.split(line) == expected
    assert main(["status", str(run_dir)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("resume:"))
    assert shlex.split(line.split("resume:", 1)[1]) == expected


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped before its learning stage: config.yaml, status.json, metrics.jsonl, results.json."""

    tmp_path = tmp_path_factory.mktemp("stopped")
    config, run_dir = learn_recipe(tmp_path), tmp_path / "runs" / "r1"
    with pytest.MonkeyPatch.context() as m:
        stop_at(m)
        assert main(["run", str(config), "--run-dir", str(run_dir)]) == 130
    (run_dir / "metrics.jsonl").write_text('{"stage": "maskllm", "step": 1, "loss": 2.5}\n')
    return config, run_dir


def damaged_copy(stopped_run, tmp_path, name, text):
    import shutil

    run_dir = shutil.copytree(stopped_run[1], tmp_path / "runs" / "r1")
    (run_dir / name).write_text(text)
    return run_dir


@pytest.mark.parametrize("text", ["{{{ not yaml", "", "- a list\n- not a mapping\n", "just a string\n"],
                         ids=["garbage", "empty", "a list", "a scalar"])
def test_a_run_directory_with_a_bad_config_yaml_is_one_line_for_status_and_run_and_listed_by_runs(
        text, stopped_run, tmp_path, capsys):
    run_dir = damaged_copy(stopped_run, tmp_path, "config.yaml", text)
    cli_fails(["status", str(run_dir)], capsys, f"{run_dir / 'config.yaml'}", one_line=True)
    cli_fails(["run", str(run_dir / "config.yaml"), "--run-dir", str(run_dir)], capsys, f"{run_dir / 'config.yaml'}",
              one_line=True)
    cli_fails(["run", str(stopped_run[0]), "--run-dir", str(run_dir)], capsys, f"{run_dir / 'config.yaml'}",
              one_line=True)
    import shutil

    shutil.copytree(stopped_run[1], tmp_path / "runs" / "r2")
    capsys.readouterr()
    assert main(["runs", "--runs-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "r2" in out and "stopped" in out and "r1" in out and "unreadable" in out


@pytest.mark.parametrize("text", ["{{{", "[1, 2]", '"running"'], ids=["garbage", "a list", "a string"])
def test_a_garbage_status_json_is_one_line_for_status(text, stopped_run, tmp_path, capsys):
    run_dir = damaged_copy(stopped_run, tmp_path, "status.json", text)
    cli_fails(["status", str(run_dir)], capsys, f"{run_dir / 'status.json'}", one_line=True)


def test_a_metrics_line_cut_short_is_dropped_with_a_warning_and_the_run_resumes_to_the_end(stopped_run, tmp_path,
                                                                                           capsys, caplog):
    run_dir = damaged_copy(stopped_run, tmp_path, "metrics.jsonl",
                           '{"stage": "maskllm", "step": 1, "loss": 2.5}\n{"stage": "maskllm", "st')
    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 0
    assert "step: 1\n" in capsys.readouterr().out
    assert "metrics.jsonl: line 2 is cut short; dropped" in caplog.text
    assert main(["run", str(stopped_run[0]), "--run-dir", str(run_dir)]) == 0
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]  # the cut line is gone, none joined it


def test_bad_yaml_in_an_override_is_one_line(tmp_path, capsys):
    config = learn_recipe(tmp_path)
    cli_fails(["run", str(config), "stages=[{stage: learn", "--run-dir", str(tmp_path / "r")], capsys,
              "stages=[{stage: learn", tmp_path / "r", one_line=True)


# ----------------------------------------------------------------------------------------------- corpora


def binary_after_first_mib(path):
    text = (CORPORA / "kjv.train.txt").read_bytes()
    blob = (text * (2 * 2**20 // len(text) + 1))[: 2**20 + 100]
    path.write_bytes(blob + b"\n\xff\xfe\x00\x80 binary tail\n")
    return path


@pytest.mark.parametrize("command", ["oneshot", "eval"])
def test_a_corpus_with_binary_bytes_after_its_first_mib_is_one_line(command, tmp_path, capsys):
    corpus = binary_after_first_mib(tmp_path / "c.txt")
    argv = (["oneshot", *MODEL_FLAGS, "--method", "wanda", "--n-samples", "2", "--seqlen", "32",
             "--out", str(tmp_path / "out")] if command == "oneshot"
            else ["eval", *MODEL_FLAGS, "--seqlen", "32", "--out", str(tmp_path / "out")])
    cli_fails([*argv, "--data", str(corpus)], capsys, f"corpus {str(corpus)!r}: not UTF-8 text", tmp_path / "out",
              one_line=True)


def test_a_corpus_of_one_long_line_streams_in_linear_time(tmp_path):
    line = " ".join((CORPORA / "kjv.train.txt").read_text().split())
    corpus = tmp_path / "line.txt"
    corpus.write_text((line + " ") * (4 * 2**20 // len(line) + 1))  # a few MB, no newline
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "maskpipe.jobs.cli", "oneshot", *MODEL_FLAGS, "--method", "wanda",
                           "--n-samples", "2", "--seqlen", "32", "--data", str(corpus), "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 120


def test_pieces_and_the_moving_head_give_the_blocks_of_whole_record_tokenization(tokenizer, monkeypatch):
    from maskpipe.pipeline.core.schema import DataConfig
    from maskpipe.pipeline.io import data

    cfg = DataConfig(sources=[str(CORPORA / "kjv.train.txt")], shuffle_blocks=1, shuffle_buffer=0)
    records = [r["text"] for r in data._load_source(cfg.sources[0])]
    ids = [t for r in records if r.strip() for t in tokenizer(r, add_special_tokens=False)["input_ids"]
           + [tokenizer.eos_token_id]]
    expected = [ids[i: i + 32] for i in range(0, 200 * 32, 32)]
    assert [b.tolist() for b in data.TokenStream(cfg, tokenizer, 32).next_batch(200)] == expected
    # a record cut in pieces mid-way resumes at the same piece: blocks after a state equal blocks without one
    monkeypatch.setattr(data, "PIECE_CHARS", 97)
    monkeypatch.setattr(data.piece_end, "__defaults__", (97,))
    mid_record = 0
    for n in range(1, 16):
        whole = data.TokenStream(cfg, tokenizer, 32)
        whole.next_batch(n)
        state = json.loads(json.dumps(whole.state_dict()))
        mid_record += "offset" in state["start"]["sources"][0]
        rest = whole.next_batch(20)
        again = data.TokenStream(cfg, tokenizer, 32)
        again.load_state_dict(state)
        assert torch.equal(again.next_batch(20), rest), n
    assert mid_record  # some of those states were inside a record


# ------------------------------------------------------------------------------------------------ paths


def test_a_runs_config_yaml_records_absolute_paths_and_resumes_from_another_directory(tmp_path, monkeypatch, capsys):
    import os

    import yaml

    from tests.conftest import MICRO

    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir(), elsewhere.mkdir()
    raw = yaml.safe_load(learn_recipe(tmp_path).read_text())
    raw["model"]["name_or_path"] = os.path.relpath(MICRO, start)
    raw["data"]["calib"]["sources"] = [os.path.relpath(CORPORA / "kjv.train.txt", start)]
    (start / "c.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(start)
    with monkeypatch.context() as m:
        stop_at(m)
        assert main(["run", "c.yaml", "--run-dir", "r"]) == 130
    recorded = yaml.safe_load((start / "r" / "config.yaml").read_text())
    assert recorded["model"]["name_or_path"] == str(MICRO)
    assert recorded["data"]["calib"]["sources"][0]["path"] == str(CORPORA / "kjv.train.txt")
    monkeypatch.chdir(elsewhere)
    assert main(["run", str(start / "r" / "config.yaml"), "--run-dir", str(start / "r")]) == 0
    # the original config, from where it was started, resumes it too (nothing to do: it is complete)
    monkeypatch.chdir(start)
    assert main(["run", "c.yaml", "--run-dir", "r"]) == 0


@pytest.mark.parametrize("flag", ["--model", "--data"])
def test_a_missing_relative_path_says_it_was_resolved_against_the_current_directory(flag, tmp_path, monkeypatch,
                                                                                     capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["oneshot", *MODEL_FLAGS, "--method", "wanda", "--n-samples", "2", "--data", str(CORPORA / "kjv.train.txt"),
            "--out", "o"]
    argv[argv.index(flag) + 1] = "./nowhere/x.txt" if flag == "--data" else "./nowhere/model"
    cli_fails(argv, capsys, f"(a relative path, resolved against the current directory {tmp_path})", tmp_path / "o",
              one_line=True)


@pytest.mark.parametrize("change", ["truncated", "edited in place"])
def test_a_corpus_changed_between_kill_and_resume_is_refused_saying_what_changed(change, tmp_path, monkeypatch,
                                                                                 capsys):
    import yaml

    corpus = tmp_path / "train.txt"
    corpus.write_bytes((CORPORA / "kjv.train.txt").read_bytes())
    config = learn_recipe(tmp_path, steps=4)
    raw = yaml.safe_load(config.read_text())
    raw["data"]["calib"]["sources"] = [str(corpus)]
    config.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "r"
    with monkeypatch.context() as m:
        die_after_step(m, 2)
        assert main(["run", str(config), "--run-dir", str(run_dir)]) == 130
    text = corpus.read_bytes()
    if change == "truncated":
        corpus.write_bytes(text[: len(text) // 2])
        message = f"{corpus} changed since the checkpoint ({len(text)} -> {len(text) // 2} bytes)"
    else:
        corpus.write_bytes(text.replace(b"the", b"THE", 1))
        message = "differs from what is read now (the corpus changed since)"
    cli_fails(["run", str(config), "--run-dir", str(run_dir)], capsys, message, one_line=True)
    corpus.write_bytes(text)  # as it was: the run resumes
    assert main(["run", str(config), "--run-dir", str(run_dir)]) == 0


# ------------------------------------------------------------------------------------------- validate


@pytest.mark.parametrize("drop,missing", [("config.json", "config"), ("model.safetensors", "weights"),
                                          ("tokenizer*", "tokenizer"), ("tokenizer.[jm]*", "tokenizer")])
def test_a_model_folder_without_its_config_weights_or_tokenizer_is_refused_by_validate_and_oneshot(
        drop, missing, tmp_path, capsys):
    import shutil

    import yaml

    from tests.conftest import MICRO

    model = shutil.copytree(MICRO, tmp_path / "model")
    for f in model.glob(drop):
        f.unlink()
    raw = yaml.safe_load(learn_recipe(tmp_path).read_text())
    raw["model"]["name_or_path"] = str(model)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cli_fails(["validate", str(tmp_path / "c.yaml")], capsys,
              f"model.name_or_path: {model}: a model folder without its {missing}", one_line=True)
    cli_fails(["oneshot", "--model", str(model), "--method", "magnitude", "--out", str(tmp_path / "o")], capsys,
              f"--model: {model}: a model folder without its {missing}", tmp_path / "o", one_line=True)


@pytest.mark.parametrize("name,text,message", [
    ("empty.txt", "", "empty corpus"),
    ("blank.txt", "\n \n\n", "empty corpus"),
    ("one-line.txt", "In the beginning God created the heaven and the earth.\n", "fewer than one"),
    ("other-field.jsonl", '{"body": "In the beginning God created the heaven and the earth."}\n' * 50,
     "no text field 'text'"),
], ids=["empty", "blank lines", "one line", "jsonl without its text field"])
def test_a_corpus_no_stage_can_read_a_sequence_from_is_refused_by_validate_and_the_quick_commands(
        name, text, message, tmp_path, capsys, monkeypatch):
    import yaml

    from maskpipe.pipeline.io import session

    corpus = tmp_path / name
    corpus.write_text(text)
    monkeypatch.setattr(session, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    raw = yaml.safe_load(learn_recipe(tmp_path).read_text())
    raw["data"]["calib"]["sources"] = [str(corpus)]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    err = cli_fails(["validate", str(tmp_path / "c.yaml")], capsys, "stages.1.data (calib): ", one_line=True)
    assert str(corpus) in err and message in err, err
    for argv in (["oneshot", *MODEL_FLAGS, "--method", "wanda", "--n-samples", "2", "--seqlen", "32"],
                 ["eval", *MODEL_FLAGS, "--seqlen", "32"]):
        err = cli_fails([*argv, "--data", str(corpus), "--out", str(tmp_path / "out")], capsys,
                        f"--data (", tmp_path / "out", one_line=True)
        assert str(corpus) in err and message in err, err


# --------------------------------------------------------------------------------- smaller messages


def test_a_run_stopped_during_eval_says_it_stopped_in_eval_not_at_an_earlier_stages_step(tmp_path, monkeypatch,
                                                                                         capsys):
    import yaml

    raw = yaml.safe_load(learn_recipe(tmp_path, steps=2).read_text())
    raw["stages"].append({"stage": "eval", "data": ["calib"], "seqlen": 32})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    stop_at(monkeypatch, "eval")
    capsys.readouterr()
    assert main(["run", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "r")]) == 130
    err = capsys.readouterr().err
    assert "stopped in eval; resume with:" in err and "at step" not in err, err
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert status["stage"] == "eval" and status["step"] is None


def test_a_stages_error_is_printed_once_and_kept_in_run_log(tmp_path):
    import yaml

    from tests.test_nothing_lost import FIXTURE

    raw = yaml.safe_load(learn_recipe(tmp_path).read_text())
    raw["stages"] = [{**raw["stages"][1], "pattern": "4:8", "prior": {"artifact": str(FIXTURE)}}]  # a 2:4 prior
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, "-m", "maskpipe.jobs.cli", "run", str(tmp_path / "c.yaml"), "--run-dir",
                          str(tmp_path / "r")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-3000:]
    said = [line for line in out.stderr.splitlines() if "is 2:4, the stage learns 4:8" in line]
    assert len(said) == 1 and said[0].startswith("error: "), out.stderr[-3000:]
    assert "is 2:4, the stage learns 4:8" in (tmp_path / "r" / "run.log").read_text()


def test_a_run_whose_own_config_does_not_validate_is_not_told_to_resume_with_it(tmp_path, capsys):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("name: r\nstages: 5\n")  # YAML, a mapping, but no config
    err = cli_fails(["run", str(learn_recipe(tmp_path)), "--run-dir", str(run_dir)], capsys,
                    f"{run_dir / 'config.yaml'}: the run's own config does not validate", one_line=True)
    assert "resume it with its own config.yaml" not in err


def test_submit_on_a_live_run_says_it_is_in_use_not_resume(tmp_path, capsys):
    from maskpipe.pipeline.io.rundir import RunLock

    config, run_dir = learn_recipe(tmp_path), tmp_path / "r"
    with RunLock(run_dir):  # a live run's driver owns its directory
        (run_dir / "config.yaml").write_text(config.read_text())
        err = cli_fails(["submit", str(config), "--run-dir", str(run_dir), "--address", "http://127.0.0.1:9"], capsys,
                        f"{run_dir}: run directory in use by pid", one_line=True)
    assert "resume" not in err


@pytest.mark.parametrize("argv,flag", [
    (["eval", "--seqlen", "0"], "--seqlen"),
    (["eval", "--stride", "0"], "--stride"),
    (["oneshot", "--method", "wanda", "--n-samples", "0"], "--n-samples"),
    (["oneshot", "--method", "wanda", "--pattern", "4:2"], "--pattern"),
])
def test_a_quick_command_names_the_flag_of_a_bad_value_not_the_config_key(argv, flag, tmp_path, capsys):
    err = cli_fails([*argv, *MODEL_FLAGS, "--data", str(CORPORA / "kjv.valid.txt"), "--out", str(tmp_path / "o")],
                    capsys, f"error: {flag}: ", tmp_path / "o", one_line=True)
    assert "stages.0" not in err, err


def test_maskpipe_stop_stops_a_foreground_run_as_ctrl_c_does(tmp_path, capsys):
    from maskpipe.pipeline.run.runner import read_metrics

    config, run_dir = learn_recipe(tmp_path, steps=2000), tmp_path / "r"
    first = subprocess.Popen([sys.executable, "-m", "maskpipe.jobs.cli", "run", str(config), "--run-dir", str(run_dir)],
                             cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not any("step" in m for m in read_metrics(run_dir / "metrics.jsonl")):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() else ""
            time.sleep(0.2)
        capsys.readouterr()
        assert main(["stop", str(run_dir)]) == 0
        assert f"r: stopped (pid {first.pid}); continue it with: maskpipe run" in capsys.readouterr().out
        _, err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 130 and "stopped at step" in err and "Traceback" not in err, err[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "stopped"
