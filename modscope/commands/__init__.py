"""The subcommands of the `modscope` command, one module each.

Every module has ``HELP`` (one line for the command list), ``DESCRIPTION``, ``EXAMPLE`` (the last lines of its
``--help``), ``add_arguments(parser)`` and ``run(args) -> int``. Modules import torch and onnx inside ``run`` only,
so that building the parser (and ``--help``) stays fast.
"""

#: subcommand name -> module, in the order ``modscope --help`` lists them.
COMMANDS: dict[str, str] = {
    "inspect": "modscope.commands.inspect",
    "fit": "modscope.commands.fit",
    "report": "modscope.commands.report",
    "check": "modscope.commands.check",
    "diff": "modscope.commands.diff",
    "export": "modscope.commands.export",
    "reproduce": "modscope.commands.reproduce",
}
