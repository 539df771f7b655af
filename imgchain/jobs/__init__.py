"""Block jobs: the engine (job, manager), the copy loop, and the job types (stream, commit)."""
