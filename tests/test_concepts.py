"""Tests for concept banks (every file format, every bad input) and deterministic row plans."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from synray.concepts import Concept, ConceptError, RowPlan, builtin_banks, load_bank, plan_row, plan_rows
from synray.config import RELATIONS, ConceptsConfig


# ------------------------------------------------------------------------------------- built-in
def test_builtin_everyday_bank():
    bank = load_bank("builtin:everyday")
    kinds = Counter(c.kind for c in bank)
    assert 250 <= kinds["object"] <= 400
    assert kinds["place"] >= 40 and kinds["texture"] >= 40
    names = [c.name.casefold() for c in bank]
    assert len(names) == len(set(names))
    for c in bank:
        if c.kind == "object":
            assert 3 <= len(c.backgrounds) <= 6, c
    kayak = next(c for c in bank if c.name == "kayak")
    assert "calm lake" in kayak.backgrounds and "river" in kayak.backgrounds
    assert "everyday" in builtin_banks()


def test_builtin_filters():
    places = load_bank("builtin:everyday", kinds=["place"])
    assert places and all(c.kind == "place" for c in places)
    first = load_bank("builtin:everyday", kinds=["object", "texture"], max_concepts=5)
    assert len(first) == 5 and all(c.kind in ("object", "texture") for c in first)
    assert first == load_bank("builtin:everyday", kinds=["object", "texture"])[:5]


def test_unknown_builtin_lists_available():
    with pytest.raises(ConceptError, match=r"unknown built-in.*nope.*available: builtin:everyday"):
        load_bank("builtin:nope")


# -------------------------------------------------------------------------------------- formats
def test_txt(tmp_path):
    p = tmp_path / "bank.txt"
    p.write_text("# my concepts\ndog\n\n  red   panda \n# another comment\ncat\n")
    bank = load_bank(str(p))
    assert bank == [Concept("dog", "object", ()), Concept("red panda", "object", ()), Concept("cat", "object", ())]


def test_csv(tmp_path):
    p = tmp_path / "bank.csv"
    p.write_text("concept,kind,backgrounds\nkayak,object,calm lake| river |beach\nbeach,place,\n"
                 "marble,TEXTURE,\nmug,,desk\n")
    bank = load_bank(str(p))
    assert bank[0] == Concept("kayak", "object", ("calm lake", "river", "beach"))
    assert bank[1] == Concept("beach", "place", ())
    assert bank[2].kind == "texture"
    assert bank[3] == Concept("mug", "object", ("desk",))


def test_csv_concept_column_only(tmp_path):
    p = tmp_path / "bank.csv"
    p.write_text("Concept\ndog\ncat\n")
    assert [c.name for c in load_bank(str(p))] == ["dog", "cat"]


def test_json_list_and_object(tmp_path):
    items = [{"concept": "dog", "backgrounds": ["park", "beach"]},
             {"concept": "forest", "kind": "place"}, "cat"]
    p1 = tmp_path / "a.json"
    p1.write_text(json.dumps(items))
    p2 = tmp_path / "b.json"
    p2.write_text(json.dumps({"concepts": items}))
    expected = [Concept("dog", "object", ("park", "beach")), Concept("forest", "place", ()),
                Concept("cat", "object", ())]
    assert load_bank(str(p1)) == expected
    assert load_bank(str(p2)) == expected


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p1 = tmp_path / "a.parquet"
    pq.write_table(pa.table({"concept": ["dog", "desert"], "kind": ["object", "place"],
                             "backgrounds": ["park|beach", None]}), p1)
    assert load_bank(str(p1)) == [Concept("dog", "object", ("park", "beach")), Concept("desert", "place", ())]
    p2 = tmp_path / "b.parquet"
    pq.write_table(pa.table({"concept": ["dog", "cat"], "backgrounds": [["park"], []]}), p2)
    assert load_bank(str(p2)) == [Concept("dog", "object", ("park",)), Concept("cat", "object", ())]
    p3 = tmp_path / "c.parquet"
    pq.write_table(pa.table({"concept": ["tree"]}), p3)
    assert load_bank(str(p3)) == [Concept("tree", "object", ())]


# ---------------------------------------------------------------------------------- bad inputs
def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_missing_file(tmp_path):
    with pytest.raises(ConceptError, match=r"not found: .*missing\.csv"):
        load_bank(str(tmp_path / "missing.csv"))


def test_unsupported_suffix(tmp_path):
    path = _write(tmp_path, "bank.yaml", "- dog\n")
    with pytest.raises(ConceptError, match=r"bank\.yaml.*unsupported file type '\.yaml'"):
        load_bank(path)


def test_unreadable_files(tmp_path):
    bad_json = _write(tmp_path, "bad.json", "[{\"concept\": ")
    with pytest.raises(ConceptError, match=r"cannot read concept bank .*bad\.json.*malformed JSON"):
        load_bank(bad_json)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00dog")
    with pytest.raises(ConceptError, match=r"cannot read concept bank .*bin\.txt"):
        load_bank(str(binary))
    bad_parquet = _write(tmp_path, "bad.parquet", "not parquet at all")
    with pytest.raises(ConceptError, match=r"cannot read concept bank .*bad\.parquet"):
        load_bank(bad_parquet)


def test_empty_banks(tmp_path):
    with pytest.raises(ConceptError, match=r"empty\.txt is empty"):
        load_bank(_write(tmp_path, "empty.txt", "# only a comment\n\n"))
    with pytest.raises(ConceptError, match=r"is empty after keeping kinds texture"):
        load_bank(_write(tmp_path, "objs.csv", "concept\ndog\n"), kinds=["texture"])
    with pytest.raises(ConceptError, match=r"e\.json is empty"):
        load_bank(_write(tmp_path, "e.json", "{\"concepts\": []}"))


def test_missing_concept_column(tmp_path):
    with pytest.raises(ConceptError, match=r"b\.csv: missing 'concept' column \(found columns: name, kind\)"):
        load_bank(_write(tmp_path, "b.csv", "name,kind\ndog,object\n"))
    with pytest.raises(ConceptError, match=r"b\.json: item 1 has no 'concept' key"):
        load_bank(_write(tmp_path, "b.json", json.dumps([{"concept": "dog"}, {"name": "cat"}])))
    with pytest.raises(ConceptError, match=r"needs a 'concepts' list"):
        load_bank(_write(tmp_path, "c.json", json.dumps({"items": []})))
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "b.parquet"
    pq.write_table(pa.table({"name": ["dog"]}), p)
    with pytest.raises(ConceptError, match=r"b\.parquet: missing 'concept' column"):
        load_bank(str(p))


def test_bad_kind(tmp_path):
    path = _write(tmp_path, "k.csv", "concept,kind\ndog,object\nlion,animal\n")
    with pytest.raises(ConceptError, match=r"k\.csv: line 3: bad kind 'animal' for concept 'lion'; "
                                           r"allowed: object, place, texture, shape"):
        load_bank(path)
    with pytest.raises(ConceptError, match=r"unknown concept kind\(s\) 'animal'; allowed: object"):
        load_bank("builtin:everyday", kinds=["animal"])


def test_duplicate_names(tmp_path):
    path = _write(tmp_path, "d.txt", "dog\ncat\nDog\n")
    with pytest.raises(ConceptError, match=r"d\.txt: duplicate concept name 'Dog' \(line 1 and line 3\)"):
        load_bank(path)


def test_empty_name_and_bad_spec(tmp_path):
    with pytest.raises(ConceptError, match=r"item 0 has an empty concept name"):
        load_bank(_write(tmp_path, "n.json", json.dumps([{"concept": "  "}])))
    with pytest.raises(ConceptError, match=r"'builtin:NAME' or a file path"):
        load_bank("")


# -------------------------------------------------------------------------------------- planning
@pytest.fixture(scope="module")
def objects():
    return load_bank("builtin:everyday", kinds=["object"])


def test_template_proportions(objects):
    cfg = ConceptsConfig()
    counts = Counter(p.template for p in plan_rows(objects, cfg, seed=7, start=0, count=5000))
    w = cfg.template_weights
    total = w.c + w.c_bg + w.c_rel
    for name, weight in (("c", w.c), ("c_bg", w.c_bg), ("c_rel", w.c_rel)):
        assert abs(counts[name] / 5000 - weight / total) < 0.025, counts


def test_plan_fields(objects):
    cfg = ConceptsConfig()
    for p in plan_rows(objects, cfg, seed=1, start=0, count=500):
        assert isinstance(p, RowPlan) and objects[p.label] == p.concept
        if p.template == "c_bg":
            assert p.background in p.concept.backgrounds and p.relation is None
        elif p.template == "c_rel":
            assert p.relation in RELATIONS and p.background is None
        else:
            assert p.template == "c" and p.background is None and p.relation is None


def test_concept_choice_is_roughly_uniform(objects):
    plans = plan_rows(objects[:10], ConceptsConfig(), seed=3, start=0, count=5000)
    counts = Counter(p.label for p in plans)
    assert set(counts) == set(range(10)) and max(counts.values()) - min(counts.values()) < 150


def test_determinism_and_order_independence(objects):
    cfg = ConceptsConfig()
    forward = plan_rows(objects, cfg, seed=11, start=0, count=200)
    backward = [plan_row(objects, cfg, 11, i) for i in reversed(range(200))][::-1]
    chunks = plan_rows(objects, cfg, 11, 0, 50) + plan_rows(objects, cfg, 11, 50, 150)
    assert forward == backward == chunks
    assert plan_rows(objects, cfg, seed=12, start=0, count=200) != forward


def test_weights_do_not_change_concept_choice(objects):
    a = plan_rows(objects, ConceptsConfig(), 5, 0, 100)
    b = plan_rows(objects, ConceptsConfig(template_weights={"c": 0, "c_bg": 0, "c_rel": 1}), 5, 0, 100)
    assert [p.label for p in a] == [p.label for p in b]
    assert all(p.template == "c_rel" for p in b)


def test_non_objects_use_c_and_no_background_falls_back():
    bank = [Concept("beach", "place", ()), Concept("marble", "texture", ()), Concept("rock", "object", ())]
    cfg = ConceptsConfig(template_weights={"c": 0, "c_bg": 1, "c_rel": 0})
    plans = plan_rows(bank, cfg, 0, 0, 60)
    assert all(p.template == "c" and p.background is None for p in plans)
    cfg_rel = ConceptsConfig(template_weights={"c": 0, "c_bg": 0, "c_rel": 1}, relations=["atop"])
    for p in plan_rows(bank, cfg_rel, 0, 0, 60):
        assert (p.template, p.relation) == (("c_rel", "atop") if p.concept.kind == "object" else ("c", None))


def test_plan_errors():
    with pytest.raises(ConceptError, match="empty concept bank"):
        plan_row([], ConceptsConfig(), 0, 0)
    with pytest.raises(ValueError, match=">= 0"):
        plan_row([Concept("dog", "object")], ConceptsConfig(), 0, -1)


def test_to_dict():
    p = RowPlan(Concept("dog", "object", ("park",)), 3, "c_bg", background="park")
    assert p.to_dict() == {"concept": "dog", "kind": "object", "label": 3, "template": "c_bg",
                           "background": "park", "relation": None}
