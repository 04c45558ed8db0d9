"""The `dualfocus` command: the one place that assembles every package's subcommands."""
