"""Training for tierlm's own model modules: a pre-training loop (Muon + AdamW, MTP loss),
GRPO with verifiable rewards over `tierlm.LLM` rollouts, and the `tierlm demo` model."""
