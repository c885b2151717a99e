"""The ``hub-msif`` commands, one module each, in the order ``--help`` lists them.

Each module has ``add(subparsers)`` (its parser and options; light imports only, so that ``--help``
and argument errors answer at once) and ``run(args)`` (the checks, then the heavy imports and the
work; returns the exit status). ``common`` holds what several share (``--threads``, ``--device``,
the ``--plan`` action); ``hub_msif.apps.cli`` builds the top parser from them and keeps ``main``.
"""

from hub_msif.apps.commands import attribute, demo, find_factors, fit, gradindex, hub, index, pull, push

COMMANDS = {"fit": fit, "demo": demo, "index": index, "gradindex": gradindex, "attribute": attribute, "push": push, "pull": pull,
            "find-factors": find_factors, "hub": hub}
