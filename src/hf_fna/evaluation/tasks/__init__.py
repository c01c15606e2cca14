"""The tasks of `hf-fna eval`, one module each. Every task module exposes `MODEL_KIND` (what the task needs from the
model), `load_data(settings) -> TaskData` and `run_task(runner, data) -> TaskOutcome`."""
