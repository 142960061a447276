"""The shared fixtures themselves: they must leave torch's global settings as they found them."""

import torch

from tests.conftest import deterministic_algorithms


def _mode():
    return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()


def test_deterministic_algorithms_restores_the_previous_setting():
    outer = _mode()          # what the autouse fixture set for this test
    try:
        for previous in [(False, False), (True, False), (True, True)]:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
            with deterministic_algorithms(warn_only=True):
                assert _mode() == (True, True)
            assert _mode() == previous
        torch.use_deterministic_algorithms(False)
        try:
            with deterministic_algorithms():
                raise KeyError("a failing test")
        except KeyError:
            pass
        assert _mode() == (False, False), "restored when the body raises too"
    finally:
        torch.use_deterministic_algorithms(outer[0], warn_only=outer[1])
