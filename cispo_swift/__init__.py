"""CISPO for ms-swift GRPO."""
