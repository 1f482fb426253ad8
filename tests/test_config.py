import copy

import pytest

from maskpipe.pipeline.config import apply_overrides, config_from_dict, dump_config, load_config
from maskpipe.pipeline.core.schema import ConfigError, yaml_load
from maskpipe.pipeline.core.vocab import Pattern
from tests.conftest import ROOT

BASE = {
    "name": "t",
    "model": {"name_or_path": "m"},
    "data": {"c": "a.txt"},
    "stages": [{"stage": "oneshot", "method": "wanda", "data": "c"}, {"stage": "eval", "data": ["c"]}],
}


@pytest.mark.parametrize("path", sorted([*(ROOT / "configs").glob("*.yaml"), *(ROOT / "benchmarks").glob("*.yaml")]),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_validates_and_its_snapshot_reloads(path):
    cfg = load_config(path)
    assert cfg.stages and cfg.model.name_or_path
    # A run directory's config.yaml is what a submitted or resumed run loads.
    assert config_from_dict(yaml_load(dump_config(cfg))) == cfg


def error_of(mutate, source="f.yaml"):
    raw = copy.deepcopy(BASE)
    mutate(raw)
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, source)
    return str(e.value)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r.update(sparsity={"pattern": "4:2"}), 'f.yaml: sparsity.pattern: expected "N:M" with 0<N<M, got "4:2"'),
        (lambda r: r["stages"][0].update(pattern="2:2"), 'f.yaml: stages.0.pattern: expected "N:M" with 0<N<M, got "2:2"'),
        (lambda r: r["stages"][0].update(nsamples=3), "f.yaml: stages.0.nsamples: unknown key"),
        (lambda r: r["model"].update(dtype="int3"), "f.yaml: model.dtype: Input should be"),
        (lambda r: r["stages"][0].update(n_samples=0), "f.yaml: stages.0.n_samples: Input should be greater than 0, got 0"),
        (lambda r: r["stages"][0].update(data="nope"), "f.yaml: stages.0.data: no corpus named 'nope'"),
        (lambda r: r["stages"][0].pop("data"), "f.yaml: stages.0.data: wanda needs a calibration corpus"),
        (lambda r: r["stages"][1].update(masks=["later"]), "f.yaml: stages.1.masks: no earlier stage named 'later'"),
        (lambda r: r["stages"].append({"stage": "eval", "data": ["c"]}), "f.yaml: stages.2.name: duplicate stage name 'eval'"),
        (lambda r: r.pop("model"), "f.yaml: model: Field required"),
        (lambda r: r["data"].update(d={"sources": ["a", "b"], "weights": [1]}), "f.yaml: data.d.weights: 1 weights for 2 sources"),
        (lambda r: r["stages"][1].update(stride=4096, seqlen=128), "f.yaml: stages.1.stride: must be <= seqlen"),
        (lambda r: r["stages"].append({"stage": "attention"}), "f.yaml: stages.2.data: learning gates needs a haystack corpus"),
        (lambda r: r["stages"].append({"stage": "attention", "gates_from": "later"}),
         "f.yaml: stages.2.gates_from: no earlier stage named 'later'"),
        (lambda r: r["stages"].append({"stage": "attention", "method": "random", "threshold": 0.3}),
         "f.yaml: stages.2.method: a random plan takes a streaming fraction"),
        (lambda r: r["stages"].append({"stage": "attention", "data": "c", "streaming": 1.5}),
         "f.yaml: stages.2.streaming: Input should be less than or equal to 1"),
        (lambda r: r["stages"].append({"stage": "retrieval", "niah": {"data": "nope", "lengths": [64]}}),
         "f.yaml: stages.2.niah.data: no corpus named 'nope'"),
        (lambda r: r["stages"].append({"stage": "retrieval", "niah": {"data": "c", "lengths": [64], "depths": [2]}}),
         "f.yaml: stages.2.niah.depths: expected fractions in [0, 1]"),
        (lambda r: r["stages"].append({"stage": "retrieval"}), "f.yaml: stages.2.passkey: give at least one of"),
        (lambda r: r["stages"].insert(1, {"stage": "oneshot", "method": "dsnot", "data": "c"}),
         "f.yaml: stages.1.mask_from: dsnot and dsnot-exact refine the mask of an earlier stage"),
        (lambda r: r["stages"][0].update(mask_from="x"), "f.yaml: stages.0.mask_from: dsnot and dsnot-exact refine the mask"),
        (lambda r: r["stages"].insert(0, {"stage": "oneshot", "method": "dsnot", "data": "c", "mask_from": "wanda"}),
         "f.yaml: stages.0.mask_from: no earlier oneshot or learn stage named 'wanda'"),
        (lambda r: r["stages"].append({"stage": "oneshot", "method": "dsnot", "data": "c", "mask_from": "eval"}),
         "f.yaml: stages.2.mask_from: no earlier oneshot or learn stage named 'eval'"),
        (lambda r: r["stages"].append({"stage": "oneshot", "method": "dsnot", "data": "c", "mask_from": "wanda",
                                       "pattern": "4:8"}), "f.yaml: stages.2.mask_from: wanda makes 2:4 masks, this stage 4:8"),
        (lambda r: r["stages"].append({"stage": "oneshot", "method": "dsnot", "mask_from": "wanda"}),
         "f.yaml: stages.2.data: dsnot needs a calibration corpus"),
        (lambda r: r.update(workers={"num_workers": 2, "sharded_load": True}),
         "f.yaml: workers.sharded_load: reading each rank's rows needs strategy fsdp, not ddp"),
        (lambda r: r.update(workers={"strategy": "fsdp"}),
         "f.yaml: workers.strategy: fsdp runs on Ray workers: set workers.num_workers ≥ 1"),
        (lambda r: r.update(workers={"num_workers": 2, "strategy": "none"}),
         "f.yaml: workers.strategy: none runs one worker, not 2: use ddp, fsdp or deepspeed"),
        (lambda r: r.update(workers={"num_workers": 3, "strategy": "fsdp", "shard_group": 2}),
         "f.yaml: workers.shard_group: hybrid sharding needs strategy fsdp and a number of workers that is a multiple of 2"),
        (lambda r: r.update(workers={"num_workers": 3}) or r["stages"].append({"stage": "learn", "data": "c", "steps": 2}),
         "f.yaml: stages.2.batch_size: batch_size 8 does not split evenly over 3 workers (workers.num_workers)"),
        (lambda r: r.update(workers={"num_workers": 3}) or r["stages"].append({"stage": "dynamic", "data": "c"}),
         "f.yaml: stages.2.batch_size: batch_size 4 does not split evenly over 3 workers (workers.num_workers)"),
        (lambda r: r["stages"][0].update(method="obs"), "f.yaml: stages.0.method: Input should be 'magnitude', 'wanda', "
                                                        "'sparsegpt', 'dsnot' or 'dsnot-exact'"),
    ],
)
def test_errors_name_file_and_key(mutate, expected):
    assert expected in error_of(mutate)


def test_unquoted_pattern_in_yaml_stays_a_pattern(tmp_path):
    # YAML 1.1 would read 2:4 as the base-60 integer 124.
    f = tmp_path / "c.yaml"
    f.write_text("name: t\nmodel: {name_or_path: m}\nsparsity: {pattern: 4:8}\nstages: [{stage: oneshot, method: magnitude}]\n")
    assert load_config(f).sparsity.pattern == Pattern(4, 8)


def test_overrides_set_nested_keys_and_list_items(tmp_path):
    raw = apply_overrides(BASE, ["stages.0.n_samples=4", "model.dtype=float32", "sparsity.pattern=4:8"], "f")
    cfg = config_from_dict(raw)
    assert cfg.stages[0].n_samples == 4 and cfg.model.dtype == "float32" and cfg.sparsity.pattern == Pattern(4, 8)
    assert BASE["stages"][0].get("n_samples") is None  # the input is not mutated
    with pytest.raises(ConfigError, match="stages has no item 7"):
        apply_overrides(BASE, ["stages.7.method=x"], "f")
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides(BASE, ["stages"], "f")


def test_overrides_address_a_stage_by_its_name_or_its_default_name():
    raw = {**BASE, "stages": [*BASE["stages"], {"stage": "learn", "name": "maskllm", "data": "c", "steps": 10}]}
    cfg = config_from_dict(apply_overrides(raw, ["stages.maskllm.steps=3", "stages.wanda.n_samples=4",
                                                 "stages.eval.seqlen=64", "stages.1.batch_size=2"], "f"))
    assert cfg.stages[2].steps == 3 and cfg.stages[0].n_samples == 4
    assert cfg.stages[1].seqlen == 64 and cfg.stages[1].batch_size == 2
    with pytest.raises(ConfigError, match=r"^f: override stages\.mask\.steps: stages has no item named 'mask' "
                                          r"\(names: wanda, eval, maskllm\)$"):
        apply_overrides(raw, ["stages.mask.steps=3"], "f")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match=f"{bad}: <root>: expected a mapping"):
        load_config(bad)


def test_stage_names_default_to_method_or_kind():
    cfg = config_from_dict(BASE)
    assert [s.name for s in cfg.stages] == ["wanda", "eval"]


def test_pattern_parses_prints_and_validates_in_one_place():
    assert Pattern.parse("2:4") == Pattern(2, 4) and tuple(Pattern.parse("4:8")) == (4, 8)
    assert str(Pattern(2, 4)) == "2:4" and Pattern.parse(Pattern(1, 2)) == Pattern(1, 2)
    for bad in ["4:2", "0:4", "2", "a:b", "2:4:8", None]:
        with pytest.raises(ValueError, match='expected "N:M" with 0<N<M'):
            Pattern.parse(bad)
    with pytest.raises(ValueError, match='got "3:3"'):
        Pattern(3, 3)
    # A config holds a Pattern and dumps it as "N:M", so snapshots and manifests keep the string form.
    cfg = config_from_dict({**BASE, "sparsity": {"pattern": "4:8"}})
    assert cfg.sparsity.pattern == Pattern(4, 8) and cfg.stages[0].pattern is None
    assert cfg.model_dump()["sparsity"] == {"pattern": "4:8"} == yaml_load(dump_config(cfg))["sparsity"]
    assert cfg.stage_pattern(cfg.stages[0]) == Pattern(4, 8)


def test_learn_lr_defaults_to_a_move_of_one_and_a_half_prior_margins_but_never_less_than_3_percent_a_step():
    from maskpipe.pipeline.stages.learn import LR_MARGINS, MIN_STEP_MARGIN, LearnStage

    def lr(**kw):
        return LearnStage.model_validate({"stage": "learn", "data": "x", **kw}).lr

    assert (LR_MARGINS, MIN_STEP_MARGIN) == (3.0, 0.03)
    assert lr(steps=50, prior={"stage": "sparsegpt"}) == pytest.approx(3 * 10 * 0.01 / 50)  # strength 10
    assert lr(steps=50, prior={"stage": "sparsegpt", "strength": 3}, init_std=0.02) == pytest.approx(3 * 3 * 0.02 / 50)
    assert lr(steps=50) == pytest.approx(3 * 0.01 / 50)  # no prior: the init's spread is the margin
    # From 100 steps on, a step moves a logit 3% of the margin: a longer run moves it further.
    assert lr(steps=100, prior={"stage": "sparsegpt"}) == lr(steps=5000, prior={"stage": "sparsegpt"}) == pytest.approx(3e-3)
    assert lr(steps=150, lr=1e-3, prior={"stage": "sparsegpt"}) == 1e-3  # an explicit lr wins
    assert lr(steps=2, prior={"stage": "sparsegpt"}) == pytest.approx(0.1 * 10 * 0.01)  # >= 10 steps to flip


def test_fsdp_loads_each_ranks_rows_unless_told_otherwise():
    from maskpipe.pipeline.config import WorkersConfig

    assert WorkersConfig(num_workers=2, strategy="fsdp").loads_sharded
    assert not WorkersConfig(num_workers=2, strategy="fsdp", sharded_load=False).loads_sharded
    assert not WorkersConfig(num_workers=2, strategy="deepspeed").loads_sharded


def test_the_strategy_and_batch_rules_are_one_function_each():
    from maskpipe.pipeline.core.vocab import STRATEGIES, check_batch_split, strategy_problem

    assert check_batch_split(8, 0) == 8 and check_batch_split(8, 4) == 2
    with pytest.raises(ValueError, match="batch_size 8 does not split evenly over 3 workers"):
        check_batch_split(8, 3)
    assert all(strategy_problem(s, 2, distributed=True) is None for s in STRATEGIES if s != "none")
    assert strategy_problem("zero", 1)[0] == "strategy"
    # the library asks with its process group; the config with its number of workers
    assert strategy_problem("deepspeed", 1, distributed=False)[1].startswith("deepspeed runs on Ray workers")
    assert strategy_problem("deepspeed", 1, distributed=True) is None
    assert strategy_problem("fsdp", 4, shard_group=2) is None and strategy_problem("ddp", 4, shard_group=2)[0] == "shard_group"
