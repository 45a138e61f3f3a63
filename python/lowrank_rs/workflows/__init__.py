"""Whole jobs built on the library: the fine-tuning job with its reports and plots, and the core demo."""
