"""The `snncompile` command. Every SnnCompileError becomes one line on stderr and a non-zero exit."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .errors import SnnCompileError

__all__ = ["main", "cli"]


class _Group(click.Group):
    """Turns our errors into one-line messages with the error's exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SnnCompileError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="snncompile")
def cli() -> None:
    """Train spiking networks (STBP), export them to ONNX, verify runtimes spike by spike."""


@cli.command()
@click.argument("model_toml", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. train.lr=0.01.")
@click.option("--out", "out_root", default="export", show_default=True, type=click.Path(file_okay=False, path_type=Path), help="Artifact root.")
@click.option("--resume", type=click.Path(file_okay=False, path_type=Path), help="Continue this run directory from its last checkpoint.")
@click.option("--stop-after", type=click.IntRange(min=1), help="Stop after this many epochs in total (resumable).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train(model_toml, overrides, out_root, resume, stop_after, no_progress) -> None:
    """Train MODEL_TOML (e.g. models/digits.toml) into a new run directory under --out."""
    from .config import load_config
    from .errors import ConfigError
    from .train import train as run_training

    if resume is None and model_toml is None:
        raise ConfigError("give a model TOML (e.g. models/digits.toml) or --resume RUN_DIR")
    if resume is not None and (model_toml is not None or overrides):
        raise ConfigError("--resume continues a run with its own config: drop MODEL_TOML and --set")
    cfg = load_config(model_toml, list(overrides)) if resume is None else None
    result = run_training(cfg, out_root, resume=resume, stop_after=stop_after, progress=not no_progress, echo=click.echo)
    click.echo(
        f"final test accuracy {100 * result.test_acc:.2f} % after {result.epochs_done} epochs, "
        f"{result.elapsed_s:.1f} s wall; run: {result.run_dir}"
    )


def main() -> None:
    cli(prog_name="snncompile")


if __name__ == "__main__":
    sys.exit(main())
