"""Shared fixtures: the tiny zoo UNet and its compressed form, built once per session."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("FXPRESS_QUIET", "1")
# Triton kernels run in the CPU interpreter unless a run sets TRITON_INTERPRET=0 on a GPU machine;
# it must be set before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FXPRESS_TUNE", "0")
# tuning choices go to a scratch folder, never the user's ~/.cache
os.environ.setdefault("FXPRESS_CACHE_DIR", tempfile.mkdtemp(prefix="fxpress-cache-"))
# FXPRESS_TEST_THREADS=1 while another job holds a core: two threads on one free core wait on each other
torch.set_num_threads(int(os.environ.get("FXPRESS_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))


@pytest.fixture(scope="session")
def tiny_unet():
    """(model, example inputs) of the zoo's tiny-unet."""
    from fxpress.frontends import zoo

    entry = zoo.get("tiny-unet")
    return entry.build(), entry.example_inputs()


@pytest.fixture(scope="session")
def tiny_compressed(tiny_unet):
    """The tiny UNet compressed with the default BitsFusion recipe at 1.99 bits."""
    import fxpress

    model, example = tiny_unet
    return fxpress.compress(model, example, "bitsfusion", target_bits=1.99)


@pytest.fixture(scope="session")
def tiny_artifact(tiny_compressed, tmp_path_factory):
    """Path of the saved artifact of `tiny_compressed`."""
    import fxpress

    path = tmp_path_factory.mktemp("artifacts") / "tiny-unet"
    fxpress.save(tiny_compressed, path)
    return path
