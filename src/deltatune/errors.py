"""The one exception type users see.

Every problem a person can fix (a bad path, a malformed line, a target that matches
nothing, an adapter made for another model) is raised as ``DeltatuneError`` with one
sentence that names the thing and the fix. The CLI prints that sentence and exits 1;
anything else is a bug and keeps its traceback.
"""


class DeltatuneError(Exception):
    """A user-facing error: one sentence naming the problem and the fix."""
