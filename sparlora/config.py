"""Load a recipe config: a hydra YAML file from conf/ plus command-line overrides.

Every stage entry point takes `--config conf/<corpus>.yaml` and any number of hydra
overrides (`method.rank=16`, `train.epochs=3`). The config is composed with hydra's
compose API, so no output folder is created and the working directory never changes.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)

RECIPE_CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def load_config(config_file: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose `config_file` (a YAML file inside a hydra config folder) with overrides."""
    path = Path(config_file).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")
    overrides = list(overrides)
    if path.parent != RECIPE_CONF_DIR:
        # A config outside conf/ still finds the method/ group of the recipe.
        overrides.append(f"hydra.searchpath=[file://{RECIPE_CONF_DIR}]")
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base="1.3"):
            cfg = compose(config_name=path.stem, overrides=overrides)
    except HydraException as error:
        raise ValueError(f"invalid config {config_file} with overrides {list(overrides)}: {error}") from error
    OmegaConf.resolve(cfg)
    return cfg


def stage_argument_parser(description: str) -> argparse.ArgumentParser:
    """Return the argument parser shared by the stage entry points."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="recipe config, e.g. conf/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. method.rank=16 train.epochs=3")
    return parser


def parse_stage_args(description: str, argv: Sequence[str] | None = None) -> DictConfig:
    """Parse `--config FILE [overrides...]`, set up logging and return the composed config."""
    args = stage_argument_parser(description).parse_args(argv)
    setup_logging()
    return load_config(args.config, args.overrides)


def run_main(main, argv: Sequence[str] | None = None) -> int:
    """Run a stage entry point; an error in the user's data or settings ends it with one log line.

    Errors that carry their own explanation (invalid values, missing files, failed checks)
    are logged without a traceback and return exit status 1. Set SPARLORA_DEBUG=1 to get the
    traceback too. Anything else propagates with its traceback, as a bug should.
    """
    import os

    try:
        return main(argv)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as error:
        setup_logging()
        logger.error("%s: %s", type(error).__name__, error, exc_info=os.environ.get("SPARLORA_DEBUG") == "1")
        return 1


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr with a timestamp and the module name, as every stage does."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s [%(name)s] %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Print one config value: `python -m sparlora.config --config FILE --get KEY [overrides]`."""
    parser = stage_argument_parser("Print one value of a recipe config.")
    parser.add_argument("--get", required=True, help="dotted key, e.g. corpus.source_dir")
    args = parser.parse_args(argv)
    value = OmegaConf.select(load_config(args.config, args.overrides), args.get, throw_on_missing=True)
    print(value)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
