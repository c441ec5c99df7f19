"""`nemodiff-compile`: one click command per file, thin. Heavy imports happen inside the commands,
so `nemodiff-compile --help` never imports torch."""

from __future__ import annotations

import click

from .bench_gpu import bench_gpu
from .build import build
from .doctor import doctor
from .generate import generate
from .info import info
from .inspect import inspect
from .serve import serve
from .validate import bench, validate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nemodiff-compile")
def cli() -> None:
    """Compile, run and validate NVIDIA Nemotron-Labs-Diffusion language models."""


for command in (build, doctor, generate, info, inspect, validate, bench, bench_gpu, serve):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="nemodiff-compile")
