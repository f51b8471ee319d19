"""Data curation: cleaning, quality rules, language id, exact and near dedup, perplexity filter.

Entry point: ``pipeline.run_curation(config, inputs, output_dir, workers)`` with a
``config.CurationConfig``; CLI: ``tools/curate_data.py``. User guide: docs/curation.md.
"""
