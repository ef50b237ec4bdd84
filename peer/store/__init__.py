"""What is written to disk, always atomically: the one atomic-write helper, this peer's local state
(``<state-dir>/state.safetensors``), and Hugging Face checkpoints (format, crash-safe writer, verified loader, the
HTTP client for a coordinator's checkpoints). Errors say what is wrong with which path; the command that called adds
which flag to change."""
