"""Command-line entry points: `maskpipe …` (cli), submitted jobs (submit), mask exchange (interop)."""
