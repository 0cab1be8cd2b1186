"""Pretraining objectives: masked LM (MxDNA)."""
