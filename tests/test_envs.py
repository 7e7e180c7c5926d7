"""atom_stream/envs.py is the one place environment variables are read (DESIGN.md): no other
module of the package or its kernels reads os.environ / os.getenv, every ATOM_STREAM_* name the
code mentions is registered, every registered developer switch is in README's table, and the
accessors parse and reject as documented."""

from __future__ import annotations

import pathlib
import re

import pytest

from atom_stream import envs

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("atom_stream", "kernels") for p in (ROOT / d).rglob("*.py")]


def test_only_envs_reads_the_environment():
    readers = [str(p.relative_to(ROOT)) for p in SOURCES
               if re.search(r"os\.environ|os\.getenv|getenv\(", p.read_text())]
    assert readers == ["atom_stream/envs.py"], readers


def test_every_switch_named_in_code_is_registered_and_documented():
    named = set()
    for p in SOURCES:
        named |= set(re.findall(r"\bATOM_STREAM_[A-Z0-9_]+", p.read_text()))
    assert named <= set(envs.VARS), sorted(named - set(envs.VARS))
    readme = (ROOT / "README.md").read_text()
    for name in envs.VARS:
        if name.startswith("ATOM_STREAM_"):
            assert f"`{name}=" in readme, f"{name} missing from README's switch table"


def test_accessors(monkeypatch):
    monkeypatch.delenv("ATOM_STREAM_MOE_PAIR_M_MAX", raising=False)
    assert envs.integer("ATOM_STREAM_MOE_PAIR_M_MAX") == 8  # the registered default
    monkeypatch.setenv("ATOM_STREAM_MOE_PAIR_M_MAX", "3")
    assert envs.integer("ATOM_STREAM_MOE_PAIR_M_MAX") == 3  # read at each call
    monkeypatch.setenv("ATOM_STREAM_MOE_PAIR_M_MAX", "x")
    with pytest.raises(ValueError, match="ATOM_STREAM_MOE_PAIR_M_MAX"):
        envs.integer("ATOM_STREAM_MOE_PAIR_M_MAX")
    monkeypatch.setenv("ATOM_STREAM_SIDE_STREAM", "1")
    assert envs.flag("ATOM_STREAM_SIDE_STREAM")
    monkeypatch.delenv("ATOM_STREAM_MOE_CFG", raising=False)
    assert envs.text("ATOM_STREAM_MOE_CFG") is None
    with pytest.raises(KeyError):
        envs.flag("ATOM_STREAM_NOT_A_SWITCH")
