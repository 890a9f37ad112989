from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from schemas.recipe import RecipeError, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parent.parent
VALID = {
    "run_name": "r1",
    "output_dir": "out/r1",
    "problems": {"source": "builtin:arithmetic", "limit": 5},
    "teachers": {
        "tool": {"endpoint": "embedded"},
        "reasoning": {"base_url": "http://127.0.0.1:8000/v1", "model": "m", "api_key_env": "MY_KEY"},
    },
}


def with_change(path: str, value) -> dict:
    data = yaml.safe_load(yaml.safe_dump(VALID))
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[part]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return data


def test_every_shipped_recipe_is_valid():
    recipes = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if p.name != "prefect.yaml")
    assert len(recipes) >= 4
    for path in recipes:
        load_recipe(path, base_dir=ROOT)


def test_the_prefect_yaml_deployments_name_shipped_flows_and_recipes():
    import yaml

    from flows.orchestration.deployments import ENTRYPOINTS

    spec = yaml.safe_load((ROOT / "recipes" / "prefect.yaml").read_text())
    assert {d["entrypoint"] for d in spec["deployments"]} == set(ENTRYPOINTS.values())
    for deployment in spec["deployments"]:
        load_recipe(ROOT / deployment["parameters"]["recipe_path"], base_dir=ROOT)


def test_relative_paths_resolve_against_base_dir(tmp_path):
    data = with_change("problems.source", "data/p.jsonl") | {"output_dir": "out"}
    recipe = parse_recipe(data, base_dir=tmp_path)
    assert recipe.work_dir == tmp_path / "out" and recipe.output_dir == str(tmp_path / "out")
    assert recipe.problems.source == str(tmp_path / "data/p.jsonl")


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("teachers.tool.base_url", "localhost:8000", "teachers.tool"),
        ("teachers.reasoning.model", None, "teachers.reasoning"),
        ("teachers.reasoning.api_key_env", "sk-live-abc123!", "teachers.reasoning.api_key_env"),
        ("teachers.tool.sampling", {"temperature": 5}, "teachers.tool.sampling.temperature"),
        ("teachers.tool.max_concurrency", 0, "teachers.tool.max_concurrency"),
        ("teachers.tool.temprature", 0.5, "teachers.tool.temprature"),
        ("stitching", {"order": "sideways"}, "stitching.order"),
        ("problems.limit", None, "problems"),
        ("run_name", "bad name!", "run_name"),
        ("shard_size", 0, "shard_size"),
    ],
)
def test_bad_recipe_names_the_field(path, value, field):
    with pytest.raises(RecipeError) as err:
        parse_recipe(with_change(path, value), source="bad.yaml")
    message = str(err.value)
    assert message.startswith("bad.yaml: invalid recipe")
    assert f"  {field}" in message


def test_both_embedded_and_base_url_is_an_error():
    data = with_change("teachers.tool", {"endpoint": "embedded", "base_url": "http://x/v1", "model": "m"})
    with pytest.raises(RecipeError, match="either `endpoint: embedded` or `base_url`"):
        parse_recipe(data)


def test_not_yaml_and_not_a_mapping(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("run_name: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")


def test_api_key_is_read_from_the_named_variable(monkeypatch):
    recipe = parse_recipe(VALID)
    monkeypatch.delenv("MY_KEY", raising=False)
    with pytest.raises(RecipeError, match="MY_KEY"):
        recipe.teachers.reasoning.api_key()
    monkeypatch.setenv("MY_KEY", "secret-value")
    assert recipe.teachers.reasoning.api_key() == "secret-value"
    assert "secret-value" not in recipe.model_dump_json()
