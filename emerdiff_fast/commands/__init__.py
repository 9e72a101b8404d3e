"""The subcommands of `emerdiff-fast` (cli.py assembles them; eval lives in evaluate.py and
hyperfeatures in hyperfeatures/cli.py), and what they share (common.py)."""
