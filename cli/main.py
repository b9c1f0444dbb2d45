"""The `cfrobust` command group. Subcommands load on demand, so `--help` never imports torch."""

from __future__ import annotations

import importlib

import click

from cfrobust import __version__
from cfrobust.cli.options import UserErrorGroup
from cfrobust.openmp_spin import shorten_openmp_spin

# name -> (module, attribute); each module defines one click command and imports torch lazily.
COMMANDS = {
    "preprocess": ("cfrobust.cli.preprocess", "preprocess"),
    "train": ("cfrobust.cli.train", "train"),
    "eval": ("cfrobust.cli.evaluate", "evaluate"),
    "demo": ("cfrobust.cli.demo", "demo"),
    "fetch": ("cfrobust.cli.fetch", "fetch"),
    "shards": ("cfrobust.cli.shards", "shards"),
    "report": ("cfrobust.cli.report", "report"),
    "show": ("cfrobust.cli.show", "show"),
    "cagan": ("cfrobust.cli.cagan", "cagan"),
    "synthetic": ("cfrobust.cli.synthetic", "synthetic"),
}


class LazyGroup(UserErrorGroup):
    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name]
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="cfrobust")
def cli() -> None:
    """Train image classifiers that look at the object, not its background.

    \b
      cfrobust preprocess   raw dataset -> shards with precomputed counterfactuals
      cfrobust train        shards -> run folder (checkpoints, metrics, eval.json)
      cfrobust eval         checkpoint + shards -> eval.json
      cfrobust demo         the whole flow on the built-in dataset, CPU-sized
      cfrobust fetch        download Waterbirds, ImageNet-9 or Caltech Camera Traps
      cfrobust shards       verify shards against their manifest; merge multi-machine output
      cfrobust report       seed-averaged tables over run folders
      cfrobust show         picture grid of originals, counterfactuals, factuals, saliency
      cfrobust cagan        train or import the CAGAN inpainter for `--cf cagan`
      cfrobust synthetic    write a built-in benchmark member as Waterbirds or COCO files
    """


def main() -> None:
    shorten_openmp_spin()  # before any command imports torch: libgomp reads it once, on loading
    cli(prog_name="cfrobust")
