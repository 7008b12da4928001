"""A sheet of simulated images: several molecules and orbitals, seen by several tips in
both feedback modes. The first picture of the demo and a quick visual check of the physics."""

from __future__ import annotations

from pathlib import Path

from stm_live.report import display_rows, montage, save_png
from stm_live.simulators.imaging import (
    Placement,
    ScanFrame,
    Substrate,
    constant_current_image,
    constant_height_image,
    s_wave_image,
)
from stm_live.simulators.tip import tip_preset

# (molecule, orbital, bias V, frame side nm, tip height nm)
GALLERY_SCENES = (
    ("pentacene", "HOMO", -2.0, 2.6, 0.45),
    ("pentacene", "LUMO", 1.5, 2.6, 0.45),
    ("h2nc", "HOMO", -1.6, 3.6, 0.45),
    ("ptcda", "LUMO", 0.6, 2.4, 0.45),
    ("coronene", "HOMO", -2.0, 2.0, 0.4),
    ("porphine", "LUMO", 1.0, 2.0, 0.4),
)
GALLERY_TIPS = ("co", "tilted_co", "mixed", "double")


def render_gallery(out_dir, *, pixels: int = 96, setpoint_A: float = 10e-12) -> Path:
    """Write ``gallery.png`` into ``out_dir``: per scene the s-wave target, CO-family tips at
    constant height, and a CO-tip constant-current Z map. Returns the PNG path."""
    if int(pixels) != pixels or pixels < 16:
        raise ValueError(f"pixels must be an integer >= 16, got {pixels}")
    substrate = Substrate(corrugation=0.05)
    panels = []
    for name, orbital, bias, side, z in GALLERY_SCENES:
        placement = Placement(name, rotation_deg=0.0, orbital=orbital)
        frame = ScanFrame(0.0, 0.0, side, side, pixels=pixels, lines=pixels)
        scene = [(f"{name} {orbital} |psi|^2", s_wave_image(placement, frame, z_nm=z, bias_V=bias))]
        for tip_name in GALLERY_TIPS:
            image = constant_height_image(
                placement, frame, tip_preset(tip_name), z_nm=z, bias_V=bias, substrate=substrate
            )
            scene.append((f"{tip_name} I z={z:.2f}", image))
        z_map = constant_current_image(
            placement, frame, tip_preset("co"), setpoint_A=setpoint_A, bias_V=bias, substrate=substrate
        )
        scene.append((f"co Z @{setpoint_A * 1e12:.0f}pA", z_map))
        # data rows -> display rows (the frame's top at the top of each tile)
        panels.extend((title, display_rows(image, frame.direction)) for title, image in scene)
    out = Path(out_dir)
    return save_png(out / "gallery.png", montage(panels, ncols=2 + len(GALLERY_TIPS), tile=160))
