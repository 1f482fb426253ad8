"""A Session verifies an artifact once: the base model's fingerprint per set of layers, an artifact's
checksums while the same files are used again."""

import shutil

from maskpipe.pipeline.config import config_from_dict
from maskpipe.pipeline.io.rundir import RunDir
from maskpipe.pipeline.io.session import Session, Variant
from maskpipe.pipeline.stages import StageContext, execute, kind_of
from tests.conftest import CORPORA, FIXTURES, MICRO

ARTIFACT = FIXTURES / "artifacts" / "micro-llama-magnitude-2of4-v1"


def test_an_eval_over_two_corpora_hashes_the_base_weights_and_each_artifact_once(tmp_path, monkeypatch):
    import maskpipe.pipeline.io.artifacts; from maskpipe import pipeline
    import maskpipe.pipeline.io.session; from maskpipe import pipeline

    counts = {"fingerprint": 0, "sha256": 0}

    def counting(name, real):
        def wrapped(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(pipeline.io.session, "fingerprint", counting("fingerprint", pipeline.io.session.fingerprint))
    monkeypatch.setattr(pipeline.io.artifacts, "_sha256", counting("sha256", pipeline.io.artifacts._sha256))
    for name in ("a", "b"):
        shutil.copytree(ARTIFACT, tmp_path / name)
    for name in ("kjv", "pydocs"):  # excerpts: the count, not the perplexity, is what is tested
        (tmp_path / f"{name}.txt").write_text((CORPORA / f"{name}.valid.txt").read_text()[:4000])
    cfg = config_from_dict({
        "name": "digests", "model": {"name_or_path": str(MICRO), "dtype": "float32", "device": "cpu"},
        "data": {"kjv": {"sources": [str(tmp_path / "kjv.txt")]}, "py": {"sources": [str(tmp_path / "pydocs.txt")]}},
        "stages": [{"stage": "eval", "data": ["kjv", "py"], "seqlen": 64, "batch_size": 8}]})
    st = cfg.stages[0]
    variants = {"dense": Variant("dense"), "a": Variant("a", artifact=tmp_path / "a"),
                "b": Variant("b", artifact=tmp_path / "b")}
    session = Session(cfg.model)
    out = execute(kind_of(st), StageContext(cfg, st, RunDir(tmp_path), variants, session=session))
    assert set(out.rows) == {"dense", "a", "b"} and all(set(r) == {"kjv", "py"} for r in out.rows.values())
    assert out.rows["a"] == out.rows["b"]
    layers = len(session.load_artifact(tmp_path / "b")[0])
    # Once per Session for the layers both artifacts mask; each artifact decoded and checksummed once
    # (not once per corpus); asked for again, the last one is not read again.
    assert counts == {"fingerprint": 1, "sha256": 2 * layers}


def test_an_artifact_rewritten_in_place_is_verified_again(tmp_path, monkeypatch):
    import maskpipe.pipeline.io.session; from maskpipe import pipeline

    calls = []
    real = pipeline.io.session.load_artifact
    monkeypatch.setattr(pipeline.io.session, "load_artifact", lambda p: calls.append(p) or real(p))
    shutil.copytree(ARTIFACT, tmp_path / "a")
    session = Session(config_from_dict({"name": "x", "model": {"name_or_path": str(MICRO), "dtype": "float32",
                                                               "device": "cpu"},
                                        "stages": [{"stage": "oneshot", "method": "magnitude"}]}).model)
    session.load_artifact(tmp_path / "a")
    session.load_artifact(tmp_path / "a")
    assert len(calls) == 1
    shutil.rmtree(tmp_path / "a")
    shutil.copytree(ARTIFACT, tmp_path / "a")  # new files under the same path
    session.load_artifact(tmp_path / "a")
    assert len(calls) == 2
