"""sftkit: supervised fine-tuning of LLMs and agents."""
