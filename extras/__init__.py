"""What the core does not need to teach LLaVA: other checkpoint families and layouts, checkpointing and
resume, packing, scoring, fast inference. Modules here import core modules only, never a script."""
