"""Scenario YAML -> validated Scenario; every error names the bad key or value."""

from __future__ import annotations

import pytest
import yaml

from stm_live.simulators.scenario import ScenarioError, load_scenario, parse_scenario, scenario_names


def test_shipped_scenarios_load():
    assert {"default", "degrading"} <= set(scenario_names())
    d = load_scenario()
    assert d.name == "default" and d.tip == "co" and not d.evolution.hazards
    assert {m.molecule for m in d.molecules} >= {"pentacene", "h2pc", "coronene"}
    assert 6.0 <= d.frame.width_nm <= 8.0 and d.z_controller
    g = load_scenario("degrading")
    assert g.evolution.events[0].to == "double" and g.evolution.events[0].line == 40
    assert g.evolution.hazards["instability"] > 0
    assert set(g.evolution.recondition) == {"pulse", "shaper", "poke"}


def _base():
    return yaml.safe_load("""
molecules:
  - {molecule: pentacene, x_nm: 0.0, y_nm: 0.0}
  - {molecule: coronene, x_nm: 2.0, y_nm: 1.0}
tip: {preset: co}
""")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(colour="red"), "colour: unknown key"),
        (lambda d: d["molecules"][1].update(x_nm="far"), r"molecules\[1\]\.x_nm: expected a number, got 'far'"),
        (
            lambda d: d["molecules"][0].update(molecule="unobtainium"),
            r"molecules\[0\]\.molecule: unknown value 'unobtainium'",
        ),
        (lambda d: d["molecules"][0].update(orbital="SOMO"), r"molecules\[0\]\.orbital"),
        (lambda d: d["molecules"][0].update(orbital="HOMO-40"), r"molecules\[0\]\.orbital: .*HOMO-40"),
        (lambda d: d.update(molecules=[]), r"molecules: at least one molecule"),
        (lambda d: d["tip"].update(preset="sharp"), r"tip\.preset: unknown value 'sharp'"),
        (
            lambda d: d["tip"].update(hazards={"co_loss": 0.7, "double": 0.5}),
            r"tip\.hazards: probabilities sum to 1\.2",
        ),
        (lambda d: d["tip"].update(hazards={"meteor": 0.1}), r"tip\.hazards\.meteor: unknown key"),
        (lambda d: d["tip"].update(events=[{"frame": 0, "line": 3}]), r"tip\.events\[0\]\.to: missing"),
        (
            lambda d: d["tip"].update(recondition={"pulse": {"repair": 1.5}}),
            r"tip\.recondition\.pulse\.repair: must be <= 1",
        ),
        (lambda d: d.update(frame={"pixels": 100}), r"frame\.pixels: must be a multiple of 16"),
        (lambda d: d.update(frame={"direction": "sideways"}), r"frame\.direction: unknown value 'sideways'"),
        (lambda d: d.update(setpoint_A=-1e-12), r"setpoint_A: must be > 0"),
        (lambda d: d.update(artifacts={"white_noise": float("nan")}), r"artifacts\.white_noise: must be finite"),
        (lambda d: d.update(channels=[0, 300]), r"channels\[1\]: must be <= 127"),
        (lambda d: d.update(z_controller="yes"), r"z_controller: expected true or false"),
    ],
)
def test_errors_name_the_bad_key(mutate, message):
    data = _base()
    mutate(data)
    with pytest.raises(ScenarioError, match=message) as info:
        parse_scenario(data, source="mine.yaml")
    assert str(info.value).startswith("mine.yaml: ")


def test_valid_custom_scenario_round_trip():
    data = _base()
    data["tip"].update(events=[{"frame": 1, "line": 5, "to": "blunt"}, {"frame": 0, "line": 9, "to": "unstable"}])
    sc = parse_scenario(data, source="mine.yaml")
    assert [(e.frame, e.line, e.to) for e in sc.evolution.events] == [(0, 9, "unstable"), (1, 5, "blunt")]
    assert sc.molecules[1].x_nm == 2.0 and sc.name == "mine"


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("molecules: [unclosed\n")
    with pytest.raises(ScenarioError, match="broken.yaml: not valid YAML"):
        load_scenario(bad)
    with pytest.raises(ScenarioError, match="nothere.yaml: cannot read"):
        load_scenario(tmp_path / "nothere.yaml")
    with pytest.raises(ScenarioError, match="unknown scenario 'nosuch'.*default"):
        load_scenario("nosuch")
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ScenarioError, match="list.yaml: <top>: expected a mapping"):
        load_scenario(top)


def test_missing_sections_take_the_default_scene():
    sc = parse_scenario({"tip": {"preset": "s"}}, source="partial.yaml")
    assert sc.molecules == load_scenario("default").molecules and sc.tip == "s"
