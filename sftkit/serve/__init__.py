"""sftkit deploy: an OpenAI-compatible server over a continuous-batching engine, with LoRA adapters chosen per request."""
