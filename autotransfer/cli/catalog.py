"""`autotransfer backbones` and `autotransfer datasets`: what can be used without any files."""

from __future__ import annotations

import argparse

from autotransfer.cli.common import Command


class Backbones(Command):
    """List the backbones, their number of layer groups and where their weights come from."""

    def run(self, args: argparse.Namespace) -> int:
        from autotransfer.backbones import list_backbones

        for name, (groups, source) in list_backbones().items():
            print(f"{name:20s} {groups:3d} groups   weights: {source}")
        return 0


class Datasets(Command):
    """List the embedded data sets (usable as DATA without any files)."""

    def run(self, args: argparse.Namespace) -> int:
        from autotransfer.data import EMBEDDED

        for name, (_, size, description) in EMBEDDED.items():
            print(f"{name:10s} {size}px  {description}")
        return 0
