"""Evaluation: classification metrics, fine-tuning on labelled tasks, embeddings, plots."""
