"""Recipe files: the built-in default, TOML and YAML, and clear errors."""
from __future__ import annotations

import json

import pytest

from gct_surgery.cli import run as cli_run
from gct_surgery.errors import UserError
from gct_surgery.train.recipe import default_recipe, load_recipe, recipe_from_dict

TOML = """
opt = "sgd"          # a default for every stage
[[stage]]
name = "warm"
kind = "gates"
epochs = 2
lr = 0.1
[[stage]]
name = "all"
kind = "full"
epochs = 3
lr = 0.01
base_lr = 0.001
gate_weight_decay = 0.0
"""

YAML = """
opt: sgd
stages:
  - {name: warm, kind: gates, epochs: 2, lr: 0.1}
  - {name: all, kind: full, epochs: 3, lr: 0.01, base_lr: 0.001, gate_weight_decay: 0.0}
"""


def test_default_recipe_is_gates_then_full():
    r = default_recipe()
    assert [s.kind for s in r.stages] == ["gates", "full"]
    gates, full = r.stages
    assert gates.bn_frozen and full.bn_frozen  # BN frozen throughout: docs/gates-study.md
    assert gates.lr == pytest.approx(1e-2) and gates.opt == "adamw"
    assert full.effective_base_lr == pytest.approx(full.lr / 10)
    assert r.total_epochs == gates.epochs + full.epochs


def test_toml_and_yaml_give_the_same_recipe(tmp_path):
    (tmp_path / "r.toml").write_text(TOML)
    (tmp_path / "r.yaml").write_text(YAML)
    a, b = load_recipe(tmp_path / "r.toml"), load_recipe(tmp_path / "r.yaml")
    assert a.stages == b.stages
    assert [s.opt for s in a.stages] == ["sgd", "sgd"]
    assert a.stages[1].base_lr == 0.001 and a.stages[1].gate_weight_decay == 0.0


def test_resolved_recipe_round_trips_through_json(tmp_path):
    (tmp_path / "r.toml").write_text(TOML)
    r = load_recipe(tmp_path / "r.toml")
    again = recipe_from_dict(json.loads(json.dumps(r.to_dict())))
    assert [s.to_dict() for s in again.stages] == [s.to_dict() for s in r.stages]
    assert again.stages[1].base_lr == 0.001 and again.stages[0].freeze_bn is True


def test_only_and_override():
    r = default_recipe().only("full").override(epochs=4, lr=None)
    assert len(r.stages) == 1 and r.stages[0].kind == "full" and r.stages[0].epochs == 4


@pytest.mark.parametrize("text, message", [
    ('[[stage]]\nkind = "gates"\nlearning_rate = 0.1\n', "unknown key 'learning_rate'"),
    ('[[stage]]\nname = "x"\n', "has no kind"),
    ('[[stage]]\nkind = "everything"\n', "unknown kind"),
    ('[[stage]]\nkind = "gates"\nepochs = 0\n', "epochs"),
    ('[[stage]]\nkind = "gates"\n[[stage]]\nkind = "gates"\n', "used twice"),
    ('epochs = 3\n', "no stages"),
    ('[[stage]\nkind = 1', "not valid TOML"),
])
def test_invalid_recipes_name_the_problem(tmp_path, text, message):
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_recipe(path)


def test_bad_yaml_and_wrong_suffix_and_missing_file(tmp_path):
    (tmp_path / "r.yaml").write_text("stages: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(tmp_path / "r.yaml")
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(UserError, match="toml or .yaml"):
        load_recipe(tmp_path / "r.json")
    with pytest.raises(UserError, match="no such recipe"):
        load_recipe(tmp_path / "missing.toml")


def test_cli_reports_a_bad_recipe_in_one_line(tmp_path, capsys):
    (tmp_path / "r.toml").write_text('[[stage]]\nkind = "gates"\nlr = "fast"\n')
    (tmp_path / "c.safetensors").write_bytes(b"")
    code = cli_run(["finetune", str(tmp_path / "c.safetensors"), "--data", str(tmp_path),
                    "--out", str(tmp_path / "run"), "--recipe", str(tmp_path / "r.toml")])
    err = capsys.readouterr().err
    assert code == 2 and "lr must be a number" in err and err.count("\n") == 1
