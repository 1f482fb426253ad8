"""The stage registry: one kind per `stage:` of the config's union, each declaring what it reads."""

from maskpipe.pipeline.config import STAGE_CONFIGS, STAGE_KINDS, config_from_dict
from maskpipe.pipeline.stages import KINDS, Placement, Ref, check_registry, kind_of


def test_the_registry_and_the_config_union_name_the_same_kinds():
    check_registry()
    assert tuple(KINDS) == STAGE_KINDS
    assert [k.config for k in KINDS.values()] == list(STAGE_CONFIGS)
    assert {k: v.placement for k, v in KINDS.items()} == {
        "oneshot": Placement.DEVICE, "learn": Placement.GROUP, "eval": Placement.CELLS,
        "retrieval": Placement.DEVICE, "attention": Placement.DEVICE, "dynamic": Placement.DEVICE,
        "lm_eval": Placement.DEVICE}


def test_attention_and_dynamic_stages_train_on_a_group_when_they_learn():
    cfg = config_from_dict({
        "name": "x", "model": {"name_or_path": "m"}, "data": {"c": "a.txt"}, "workers": {"num_workers": 2},
        "stages": [{"stage": "attention", "name": "duo", "data": "c"},
                   {"stage": "attention", "name": "again", "gates_from": "duo"},
                   {"stage": "attention", "name": "random", "method": "random"},
                   {"stage": "dynamic", "name": "dma", "data": "c"},
                   {"stage": "dynamic", "name": "h2o", "method": "h2o"}]})
    assert {st.name: kind_of(st).where(st) for st in cfg.stages} == {
        "duo": Placement.GROUP, "again": Placement.DEVICE, "random": Placement.DEVICE, "dma": Placement.GROUP,
        "h2o": Placement.DEVICE}


def test_each_kind_declares_the_stages_and_corpora_it_reads():
    cfg = config_from_dict({
        "name": "x", "model": {"name_or_path": "m"}, "data": {"c": "a.txt", "d": "b.txt"},
        "stages": [{"stage": "oneshot", "method": "wanda", "data": "c"},
                   {"stage": "oneshot", "method": "dsnot", "data": "c", "mask_from": "wanda"},
                   {"stage": "learn", "data": "c", "steps": 2, "prior": {"stage": "dsnot"}},
                   {"stage": "attention", "name": "attention", "method": "random", "masks": "learn"},
                   {"stage": "eval", "data": ["c", "d"], "masks": ["learn", "attention"]},
                   {"stage": "retrieval", "niah": {"data": "d", "lengths": [64]}}]})
    reads = {st.name: kind_of(st).reads(st) for st in cfg.stages}
    assert reads == {"wanda": [], "dsnot": [Ref("mask_from", "wanda", ("oneshot", "learn"))],
                     "learn": [Ref("prior.stage", "dsnot")], "attention": [Ref("masks", "learn")],
                     "eval": [Ref("masks", "learn"), Ref("masks", "attention")], "retrieval": []}
    corpora = {st.name: kind_of(st).corpora(st) for st in cfg.stages}
    assert corpora["eval"] == {"data.0": "c", "data.1": "d"} and corpora["retrieval"] == {"niah.data": "d"}
    assert kind_of(cfg.stages[5]).lengths(cfg.stages[5]) == {"niah.lengths": 64}
