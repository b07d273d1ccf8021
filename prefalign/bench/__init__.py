"""`prefalign bench` / `prefalign generate`: prompt suites (suites), generator specs (generators), the cached and
resumable generate → score → aggregate pipeline (harness) and the leaderboards it writes (report)."""
