"""Command-line entry points: `maskpipe …` (cli assembles the parser), one module per command (commands/),
what the quick commands share (quick) and what the Ray-job commands share (ray_jobs)."""
