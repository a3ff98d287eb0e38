"""What every part of the project shares: the user-error type, the command tail and output-path checks (cli),
the one atomic file writer (files), the device choice (devices), checkpoint reading and writing
(checkpoint), the semantic region table (regions), pictures, PNGs and videos (imaging), the random draws of a
training step (draws), process-wide performance settings (perf_utils), mixed precision (precision) and the
one-output-per-image contract of the data tools (image_jobs)."""
