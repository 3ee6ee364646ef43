"""The commands, each wiring the package's parts end to end: ``test``, ``rollout``, ``serve``.

They sit on top of everything else: a command opens the server, runs the measuring code,
hands the result to the report and writes the files. ``echo_env.cli`` only parses the
command line, calls one of these and prints.
"""
