"""Diffusion process: noise schedules, the training loss, guidance and samplers."""
