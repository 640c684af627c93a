"""tasks/errors.py: one error base, a message and what to do."""

from __future__ import annotations

import pickle

from tasks.errors import HaswarmError
from tasks.ops import StepError


def test_message_and_hint_apart_and_together():
    e = StepError("the gluster command is missing", hint="install GlusterFS on the node")
    assert (e.message, e.hint) == ("the gluster command is missing",
                                   "install GlusterFS on the node")
    assert str(e) == "the gluster command is missing\n  what to do: install GlusterFS on the node"


def test_an_old_style_message_is_split_once():
    e = HaswarmError("x is missing.\n  what to do: install x")
    assert (e.message, e.hint) == ("x is missing.", "install x")
    assert str(pickle.loads(pickle.dumps(e))) == str(e)
    assert HaswarmError("plain").hint == ""
