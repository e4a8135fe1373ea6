"""conf/model/*.yaml are written from `components.presets`, so Hydra configs and presets cannot drift.

    python -m arch_lab.model_configs     # rewrite conf/model/ after changing a preset

Each file spells out every ModelConfig key, so `model.<key>=...` overrides work and a typo fails in Hydra.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from components.config import ModelConfig
from components.presets import FAMILY, SIZES, STRUCTURES, preset_values

CONF_MODEL_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"


def config_file_name(name: str, size: str) -> str:
    return f"{name}.yaml" if size == "tiny" or name in FAMILY else f"{name}_{size}.yaml"


def rendered_model_configs() -> dict[str, str]:
    files = {}
    pairs = [(n, s) for n in STRUCTURES for s in SIZES] + [(n, "tiny") for n in FAMILY]
    for name, size in pairs:
        values = ModelConfig.from_dict(preset_values(name, size)).to_dict()
        where = "its published size" if name in FAMILY else f"size {size}"
        header = f"# Preset {name!r} at {where} (written by `python -m arch_lab.model_configs`; edit presets.py).\n"
        files[config_file_name(name, size)] = header + yaml.safe_dump(values, sort_keys=False,
                                                                      default_flow_style=False)
    return files


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="python -m arch_lab.model_configs",
                            description=f"Rewrite {CONF_MODEL_DIR} from components/presets.py.").parse_args(argv)
    CONF_MODEL_DIR.mkdir(parents=True, exist_ok=True)
    for file_name, text in rendered_model_configs().items():
        (CONF_MODEL_DIR / file_name).write_text(text)
    print(f"wrote {len(rendered_model_configs())} files to {CONF_MODEL_DIR}")


if __name__ == "__main__":
    main()
