"""QA records -> prompts and labels, for SEND fine-tuning and answer generation."""
