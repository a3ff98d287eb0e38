"""What every part of the project shares: the device choice and the user-error type (devices), checkpoint
reading and writing (checkpoint), the semantic region table (regions), pictures and PNG files (imaging),
the random draws of a training step (draws) and process-wide performance settings (perf_utils)."""
