"""Training: data builders (plain-text LM corpus, multi-passage QA), the training loop and its stages."""
