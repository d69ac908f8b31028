"""Training helpers every stage shares: lr schedules, batch iteration, top-1/top-5, crop sampling,
and the DDP/DeepSpeed wrapping. Below the stages: imports nothing from squeeze, recover or evaluate."""
