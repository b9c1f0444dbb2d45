"""`cfrobust cagan train|import`: make the generator weights that `preprocess --cf cagan` fills with."""

from __future__ import annotations

import os
from pathlib import Path

import click

from cfrobust.cli.options import UserErrorGroup
from cfrobust.errors import UserError


@click.group(cls=UserErrorGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cagan() -> None:
    """Train the CAGAN inpainter (DeepFill v1) on your shards, or import released TF weights."""


# Defaults repeat CaganConfig's (preprocess/cagan/train.py), so that --help does not import torch;
# tests/test_cagan_train.py checks that the two agree.
@cagan.command(short_help="Train the inpainter on shards (background holes, WGAN-GP).")
@click.option("--shards", required=True, help="Shard root made by `cfrobust preprocess`: a folder or a URL.")
@click.option("--out", required=True, help="Generator weights to write (OUT.state and OUT.samples/ go beside it); "
              "a URL of a writable store (s3://, gs://, any fsspec protocol) uploads each once written.")
@click.option("--split", default="train", show_default=True, help="Split of --shards to train on.")
@click.option("--steps", default=100_000, show_default=True, type=int, help="Generator updates in all (each after --critic-steps critic updates).")
@click.option("--batch", default=16, show_default=True, type=int, help="Images per batch and process.")
@click.option("--lr", default=1e-4, show_default=True, type=float, help="Adam learning rate of generator and critics (betas 0.5, 0.9).")
@click.option("--cnum", default=32, show_default=True, type=int, help="Generator width (32 in the released models).")
@click.option("--critic-steps", default=5, show_default=True, type=int, help="Critic updates per generator update, each on a fresh batch.")
@click.option("--pretrain-steps", default=0, show_default=True, type=int, help="First train this many steps on the L1 losses alone, without critics.")
@click.option("--gamma", default=0.99, show_default=True, type=float, help="Spatial discount of the hole L1 (paper: 0.99; official inpaint.yml: 0.9).")
@click.option("--sample-every", default=1000, show_default=True, type=int, help="Write OUT.samples/step-N.png (input | coarse | refined | original) every N steps (0: never).")
@click.option("--save-every", default=1000, show_default=True, type=int, help="Write the training state OUT.state every N steps (0: at the end only).")
@click.option("--resume", is_flag=True, default=False, help="Continue the training saved in OUT.state.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for initial weights, shard order and holes.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda, or cuda:N.")
@click.option("--workers", default=2, show_default=True, type=int, help="DataLoader worker processes per training process.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "32", "bf16"]), help="auto: bf16 autocast on GPU, fp32 on CPU.")
@click.option("--cache-dir", default="", help="With a URL --shards: keep each shard here once its sha256 matches the manifest; later epochs read the copy.")
@click.option("--init", default="", help="Start from these generator weights: a .pt from `cagan train`/`cagan import`, or a TF checkpoint.")
def train(**options) -> None:
    """Train the CAGAN generator to complete image backgrounds: each training image gets a random
    hole that avoids its object boxes, so the model learns what `--cf cagan` asks of it.

    \b
    One process:  cfrobust cagan train --shards S --out cagan.pt
    N GPUs:       torchrun --nproc_per_node=N -m cfrobust cagan train --shards S --out cagan.pt
    Then:         cfrobust preprocess ... --cf cagan --cagan-weights cagan.pt
    """
    from cfrobust.preprocess.cagan.train import CaganConfig, train_cagan

    options = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    progress = train_cagan(CaganConfig(**options))
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"trained {progress.step} steps; generator written to {options['out']}")


@cagan.command(name="import", short_help="Convert a released TensorFlow checkpoint to a .pt file.")
@click.argument("checkpoint", metavar="CKPT", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Generator weights to write (required unless --list).")
@click.option("--list", "list_only", is_flag=True, help="Print the checkpoint's variables (name, dtype, shape) and stop.")
def import_(checkpoint: Path, out: Path | None, list_only: bool) -> None:
    """Read a DeepFill v1 TensorFlow checkpoint (the released places2/celeba/imagenet models: a
    folder with a `checkpoint` file, or a checkpoint prefix) and write its generator for
    `preprocess --cf cagan --cagan-weights OUT` or `cagan train --init OUT`. No TensorFlow needed."""
    from cfrobust.preprocess.cagan.tf_checkpoint import list_tf_variables, read_tf_checkpoint

    if list_only:
        for name, (dtype, shape) in sorted(list_tf_variables(checkpoint).items()):
            click.echo(f"{name} {dtype} {list(shape)}")
        return
    if out is None:
        raise UserError("cagan import: pass --out W.pt (or --list to only print the variables)")
    if out.exists():
        raise UserError(f"{out} already exists; choose another --out")
    from cfrobust.preprocess.cagan.weights import generator_state_from_tf, save_weights
    from cfrobust.preprocess.cagan.network import Generator

    cnum, state = generator_state_from_tf(read_tf_checkpoint(checkpoint))
    generator = Generator(cnum=cnum)
    generator.load_state_dict(state)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_weights(out, generator, meta={"source": str(checkpoint), "cnum": cnum})
    click.echo(f"{checkpoint}: generator (cnum {cnum}) written to {out}")
