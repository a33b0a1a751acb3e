"""The trainer's knobs: choices from the registries, k-NN defaults from one place, old configs still load."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

from fastmem.kernels import knn_classify
from fastmem.kernels.vote import DEFAULT_K, DEFAULT_TEMPERATURE, VOTE_WEIGHTS, VOTES, knn_vote
from fastmem.pipelines import PIPELINE_NAMES

from fastmem.probe import probe_knn
from fastmem.probe.__main__ import build_parser as probe_parser
from fastmem.probe.trt_extract import FORWARD_BUILDERS
from fastmem.run.config import EXECUTION_KNOBS, RESUMABLE_KNOBS, TrainConfig, build_parser, load_run_config
from fastmem.runtime import COMPILE_MODES, EXTRACT_BACKENDS, PRECISIONS


def _choices(parser, dest: str) -> tuple[str, ...]:
    (action,) = [a for a in parser._actions if a.dest == dest]
    return tuple(action.choices)


def test_knob_choices_are_the_registries() -> None:
    parser = build_parser()
    assert _choices(parser, "pipeline") == PIPELINE_NAMES
    assert _choices(parser, "probe_vote") == VOTES
    assert _choices(parser, "precision") == PRECISIONS
    assert _choices(parser, "extract_backend") == EXTRACT_BACKENDS
    assert _choices(parser, "compile_mode") == COMPILE_MODES
    assert _choices(probe_parser(), "vote") == VOTES and _choices(probe_parser(), "extract_backend") == EXTRACT_BACKENDS


def test_every_registered_name_has_its_implementation() -> None:
    assert tuple(VOTE_WEIGHTS) == VOTES
    assert set(FORWARD_BUILDERS) == set(EXTRACT_BACKENDS)


def test_knn_defaults_come_from_one_place() -> None:
    def default(fn, name: str):
        return inspect.signature(fn).parameters[name].default

    assert default(knn_classify, "k") == default(probe_knn, "k") == TrainConfig().probe_k == DEFAULT_K
    assert default(knn_classify, "temperature") == default(probe_knn, "temperature") == DEFAULT_TEMPERATURE
    assert default(knn_vote, "temperature") == TrainConfig().probe_temperature == DEFAULT_TEMPERATURE
    args = probe_parser().parse_args(["run"])
    assert (args.k, args.temperature) == (DEFAULT_K, DEFAULT_TEMPERATURE)


def test_probe_temperature_is_part_of_a_runs_identity() -> None:
    assert "probe_temperature" not in EXECUTION_KNOBS | RESUMABLE_KNOBS
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert names.index("probe_temperature") == names.index("extract_backend") + 1  # the last probe knob


def test_a_config_json_without_probe_temperature_still_loads(tmp_path: Path) -> None:
    saved = TrainConfig().to_dict()
    del saved["probe_temperature"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert load_run_config(tmp_path).probe_temperature == DEFAULT_TEMPERATURE
