"""Controller profiles: shipped files load, bad files name the key, limits refuse."""

from __future__ import annotations

import pytest
import yaml

from stm_live.config import PROFILE_DIR, LimitError, ProfileError, load_profile


def test_shipped_profiles_load_with_expected_values():
    sim = load_profile()  # "sim" is the default
    assert sim.host == "127.0.0.1" and sim.ports == [6501, 6502, 6503, 6504]
    assert sim.channel_indexes == {"Current": 0, "Z": 30, "Bias": 24}
    assert sim.channels["Current"].units == "A"
    assert sim.tip_policy in ("off", "prompt", "auto")
    kinds = [a.kind for a in sim.recondition.actions]
    assert kinds[0] == "bias_pulse" and kinds[-1] == "poke"  # escalating
    real = load_profile(PROFILE_DIR / "example_nanonis.yaml")
    assert real.name == "example_nanonis" and real.limits.max_abs_bias_V <= 10


def test_limits_refuse_unsafe_requests_and_name_the_limit():
    p = load_profile("sim")
    assert p.check_bias(-1.5) == -1.5
    with pytest.raises(LimitError, match=r"bias 10 V exceeds limits.max_abs_bias_V = 5 V"):
        p.check_bias(10.0)
    with pytest.raises(LimitError, match="expected a number"):
        p.check_bias("lots")
    with pytest.raises(LimitError, match="limits.max_setpoint_A"):
        p.check_setpoint(5e-9)
    with pytest.raises(LimitError, match="limits.max_frame_size_m"):
        p.check_frame(0.0, 0.0, 2e-7, 1e-8)
    with pytest.raises(LimitError, match=r"frame centre y .* limits.scan_area.y_m"):
        p.check_frame(0.0, 5e-7, 1e-8, 1e-8)
    with pytest.raises(LimitError, match="lines 4096 outside"):
        p.check_pixels(128, 4096)
    p.check_frame(0.0, 0.0, 2e-8, 2e-8)
    p.check_pixels(128, 128)
    frame = (0.0, 0.0, 2e-8, 2e-8)
    p.check_site(*p.recondition.clean_site_m, away_from=frame)
    with pytest.raises(LimitError, match="inside the imaged frame"):
        p.check_site(1e-9, 1e-9, away_from=frame)


def _write(tmp_path, edit):
    doc = yaml.safe_load((PROFILE_DIR / "sim.yaml").read_text())
    edit(doc)
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["limits"].update(max_abs_bias_V="ten"), "limits.max_abs_bias_V: expected a number, got 'ten'"),
        (lambda d: d["limits"].update(max_bias="5"), "limits.max_bias: unknown key"),
        (lambda d: d.update(ports=[6501, 6502, 6503, 6504, 6505]), "ports: expected a list of 1 to 4"),
        (lambda d: d.update(ports=[6501, 99999]), r"ports\[1\]: 99999 outside"),
        (lambda d: d["channels"]["Z"].update(index="thirty"), "channels.Z.index: expected an integer"),
        (lambda d: d.update(tip_policy="sometimes"), "tip_policy: expected one of off, prompt, auto"),
        (lambda d: d["limits"].pop("max_pixels"), "limits.max_pixels: missing"),
        (
            lambda d: d["recondition"]["actions"][0].update(kind="zap"),
            r"recondition.actions\[0\].kind: expected one of bias_pulse, poke",
        ),
        (
            lambda d: d["recondition"]["actions"][1].update(bias_V=8.0),
            r"recondition.actions\[1\].bias_V: 8 V exceeds limits.max_abs_bias_V",
        ),
        (
            lambda d: d["recondition"]["clean_site"].update(x_m=1e-6),
            "recondition.clean_site.x_m: 1e-06 m lies outside limits.scan_area.x_m",
        ),
    ],
)
def test_bad_profiles_name_the_key_and_the_file(tmp_path, edit, message):
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(_write(tmp_path, edit))
    assert "lab.yaml" in str(info.value)


def test_unreadable_or_missing_profiles(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: x\nports: [6501\n")
    with pytest.raises(ProfileError, match="broken.yaml: not valid YAML"):
        load_profile(bad)
    with pytest.raises(ProfileError, match=r"profile 'nosuch' not found.*shipped profiles: .*'sim'"):
        load_profile("nosuch")
