"""Shared pytest fixtures: chapter loading and seeding. Nothing here probes devices or starts process groups."""

import importlib

import pytest
import torch


def load(name: str):
    """Import a numbered chapter (`01_moe`), which cannot follow a plain `import`."""
    return importlib.import_module(name)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
