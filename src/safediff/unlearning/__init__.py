"""Concept unlearning by fine-tuning (ESD and relatives): parameter selection, training."""
