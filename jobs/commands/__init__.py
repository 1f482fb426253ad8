"""One module per `maskpipe` command: its `add(sub)` adds the command's subparser (arguments, help and
`set_defaults(fn=cmd_<name>)`), and `cmd_<name>(a)` is its body. `jobs/cli.py` lists them, in the order
`maskpipe --help` shows them. What several commands share is in `jobs/quick.py` (the quick commands'
model and data flags, their one-stage config) and `jobs/ray_jobs.py` (runs as Ray jobs)."""
