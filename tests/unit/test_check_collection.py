"""tests/check_collection.py: the comparison that guards against ids that change between processes."""

from __future__ import annotations

from tests.check_collection import differences


def test_identical_collections_pass() -> None:
    assert differences(["a.py::t[1]", "a.py::t[2]"], ["a.py::t[1]", "a.py::t[2]"]) == []


def test_changed_ids_are_named() -> None:
    problems = "\n".join(differences(["a.py::t[x\\x00]", "a.py::u"], ["a.py::t[x\\x01]", "a.py::u"]))
    assert "only in the first run" in problems and "a.py::t[x\\x00]" in problems
    assert "only in the second run" in problems and "a.py::t[x\\x01]" in problems
    assert "a.py::u" not in problems


def test_reordered_ids_are_reported() -> None:
    problems = differences(["a.py::t[beta]", "a.py::t[alpha]"], ["a.py::t[alpha]", "a.py::t[beta]"])
    assert problems == ["same ids in a different order, first at position 0: a.py::t[beta] vs a.py::t[alpha]"]


def test_long_lists_are_cut() -> None:
    problems = differences([f"a.py::t[{i}]" for i in range(50)], [])
    assert problems[0] == "50 test id(s) only in the first run:" and problems[-1] == "    ... and 30 more"
