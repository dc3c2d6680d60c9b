"""Fuzz the artifact loader: mutated manifests and tensor files load, or raise a typed FxpressError; never pickle."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from artifact_fuzz import OK_OUTCOMES, build_artifacts, fuzz, no_pickle, references, tiny_model

import fxpress

EXAMPLES = 200  # benchmarks/fuzz_artifacts.py runs 5,000


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    paths = build_artifacts(tmp_path_factory.mktemp("fuzz"))
    return paths, references(paths)


def test_the_pickle_guard_refuses_every_unpickler():
    buffer = io.BytesIO()
    torch.save({"x": torch.zeros(1)}, buffer)
    with no_pickle():
        for load in (lambda: torch.load(io.BytesIO(buffer.getvalue())), lambda: pickle.loads(pickle.dumps(1)),
                     lambda: pickle.Unpickler(io.BytesIO(b""))):
            with pytest.raises(AssertionError, match="pickle"):
                load()


def test_unmutated_artifacts_load_without_pickle(artifacts):
    paths, refs = artifacts
    for codec, path in paths.items():
        with no_pickle():
            model = fxpress.load(path, model=tiny_model)
        from artifact_fuzz import example_input
        with torch.no_grad():
            assert torch.equal(model(example_input()), refs[codec])


def test_fuzzed_artifacts_load_or_raise_typed_errors(artifacts):
    tally = fuzz(*artifacts, EXAMPLES)
    assert not tally.failures, tally.failures
    assert sum(tally.loads.values()) >= EXAMPLES
    assert tally.loads["ArtifactError"] > 0 and sum(tally.loads[o] for o in OK_OUTCOMES) > 0, tally.loads
